//! Derives Rust tables from the datamodel declaration in `spec/`.
//!
//! The spec is the single declaration of classes, fields, messages, enums
//! and errors. This script checks it for consistency (unknown enums, bad
//! relations, duplicate names) and writes static tables plus typed
//! per-class field constants into `$OUT_DIR/datamodel.rs`, so that a typo in
//! a field name used by hand-written code is a compile error.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::PathBuf;

#[derive(Clone, Debug)]
enum Ty {
    Prim(&'static str),
    Ref(String),
    Enum(String),
    Set(Box<Ty>),
    Map(Box<Ty>, Box<Ty>),
    Option(Box<Ty>),
    Record(String),
}

struct Field {
    name: String,
    ty: Ty,
    qual: String,
    default: Option<String>,
    set_role: Option<String>,
    ops_role: Option<String>,
    lifecycle: String,
    internal: bool,
    ext: bool,
    rel: Option<(String, String)>,
}

struct Param {
    name: String,
    ty: Ty,
    default: Option<String>,
}

struct Message {
    name: String,
    params: Vec<Param>,
    result: Ty,
    role: String,
    is_async: bool,
    lifecycle: String,
    ext: bool,
    errors: Vec<String>,
}

#[derive(Default)]
struct Class {
    name: String,
    flags: BTreeSet<String>,
    implicit: Vec<(String, String)>,
    fields: Vec<Field>,
    messages: Vec<Message>,
}

fn parse_ty(s: &str) -> Ty {
    let s = s.trim();
    let inner = |p: &str| {
        s.strip_prefix(p)
            .and_then(|r| r.strip_suffix(')'))
            .map(str::to_owned)
    };
    if let Some(i) = inner("set(") {
        return Ty::Set(Box::new(parse_ty(&i)));
    }
    if let Some(i) = inner("option(") {
        return Ty::Option(Box::new(parse_ty(&i)));
    }
    if let Some(i) = inner("map(") {
        let mut depth = 0;
        for (n, c) in i.char_indices() {
            match c {
                '(' => depth += 1,
                ')' => depth -= 1,
                ',' if depth == 0 => {
                    return Ty::Map(Box::new(parse_ty(&i[..n])), Box::new(parse_ty(&i[n + 1..])));
                }
                _ => {}
            }
        }
        panic!("bad map type {s}");
    }
    if let Some(i) = inner("ref(") {
        return Ty::Ref(i);
    }
    if let Some(i) = inner("enum(") {
        return Ty::Enum(i);
    }
    if let Some(i) = inner("record(") {
        return Ty::Record(i);
    }
    for p in [
        "string",
        "int",
        "float",
        "bool",
        "datetime",
        "void",
        "event_batch",
    ] {
        if s == p {
            return Ty::Prim(p);
        }
    }
    panic!("unknown type `{s}`")
}

fn ty_expr(t: &Ty) -> String {
    match t {
        Ty::Prim(p) => match *p {
            "string" => "Ty::String".into(),
            "int" => "Ty::Int".into(),
            "float" => "Ty::Float".into(),
            "bool" => "Ty::Bool".into(),
            "datetime" => "Ty::DateTime".into(),
            "void" => "Ty::Void".into(),
            "event_batch" => "Ty::EventBatch".into(),
            _ => unreachable!(),
        },
        Ty::Ref(c) => format!("Ty::Ref({c:?})"),
        Ty::Enum(e) => format!("Ty::Enum({e:?})"),
        Ty::Record(c) => format!("Ty::Record({c:?})"),
        Ty::Set(i) => format!("Ty::Set(&{})", ty_expr(i)),
        Ty::Option(i) => format!("Ty::Option(&{})", ty_expr(i)),
        Ty::Map(k, v) => format!("Ty::Map(&{}, &{})", ty_expr(k), ty_expr(v)),
    }
}

fn role_expr(r: &str) -> &'static str {
    match r {
        "pool-admin" => "Role::PoolAdmin",
        "pool-operator" => "Role::PoolOperator",
        "vm-power-admin" => "Role::VmPowerAdmin",
        "vm-admin" => "Role::VmAdmin",
        "vm-operator" => "Role::VmOperator",
        "read-only" => "Role::ReadOnly",
        "root" => "Role::Root",
        _ => panic!("unknown role {r}"),
    }
}

fn lifecycle_expr(l: &str) -> &'static str {
    match l {
        "depr" => "Lifecycle::Deprecated",
        "proto" => "Lifecycle::Prototype",
        _ => "Lifecycle::Published",
    }
}

fn opt_str(o: &Option<String>) -> String {
    match o {
        Some(s) => format!("Some({s:?})"),
        None => "None".into(),
    }
}

fn const_name(s: &str) -> String {
    let up = s.to_uppercase();
    match up.as_str() {
        "TYPE" | "REF" | "SELF" | "CLASS" => format!("{up}_"),
        _ => up,
    }
}

fn main() {
    let dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("manifest dir"));
    let spec_path = dir.join("spec/xenapi.spec");
    let err_path = dir.join("spec/errors.spec");
    println!("cargo:rerun-if-changed={}", spec_path.display());
    println!("cargo:rerun-if-changed={}", err_path.display());
    let spec = std::fs::read_to_string(&spec_path).expect("read spec");

    let mut enums: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut classes: Vec<Class> = Vec::new();
    for (lineno, raw) in spec.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let ctx = || format!("spec line {}: {raw}", lineno + 1);
        if let Some(rest) = line.strip_prefix("enum ") {
            let (name, vals) = rest.split_once(':').unwrap_or_else(|| panic!("{}", ctx()));
            enums.insert(
                name.trim().into(),
                vals.split_whitespace().map(str::to_owned).collect(),
            );
        } else if let Some(rest) = line.strip_prefix("class ") {
            classes.push(Class {
                name: rest.trim().into(),
                ..Default::default()
            });
        } else {
            let class = classes.last_mut().unwrap_or_else(|| panic!("{}", ctx()));
            let (kw, rest) = line.split_once(' ').unwrap_or_else(|| panic!("{}", ctx()));
            match kw {
                "flags" => class
                    .flags
                    .extend(rest.split_whitespace().map(str::to_owned)),
                "implicit" => {
                    let mut it = rest.split_whitespace();
                    let role = it.next().unwrap_or_else(|| panic!("{}", ctx())).to_owned();
                    for m in it {
                        class.implicit.push((m.into(), role.clone()));
                    }
                }
                "rel" => {
                    let mut it = rest.split_whitespace();
                    let f = it.next().unwrap_or_else(|| panic!("{}", ctx()));
                    let target = it.next().unwrap_or_else(|| panic!("{}", ctx()));
                    let (c, cf) = target
                        .split_once('.')
                        .unwrap_or_else(|| panic!("{}", ctx()));
                    let field = class
                        .fields
                        .iter_mut()
                        .find(|x| x.name == f)
                        .unwrap_or_else(|| panic!("rel on unknown field: {}", ctx()));
                    field.rel = Some((c.into(), cf.into()));
                }
                "field" => {
                    let mut it = rest.split_whitespace();
                    let name = it.next().unwrap_or_else(|| panic!("{}", ctx())).to_owned();
                    let ty = parse_ty(it.next().unwrap_or_else(|| panic!("{}", ctx())));
                    let qual = it.next().unwrap_or_else(|| panic!("{}", ctx())).to_owned();
                    let mut f = Field {
                        name,
                        ty,
                        qual,
                        default: None,
                        set_role: None,
                        ops_role: None,
                        lifecycle: String::new(),
                        internal: false,
                        ext: false,
                        rel: None,
                    };
                    for tok in it {
                        if let Some(d) = tok.strip_prefix("default=") {
                            f.default = Some(d.trim_matches('"').to_owned());
                        } else if let Some(r) = tok.strip_prefix("set=") {
                            f.set_role = Some(r.into());
                        } else if let Some(r) = tok.strip_prefix("ops=") {
                            f.ops_role = Some(r.into());
                        } else if tok == "depr" || tok == "proto" {
                            f.lifecycle = tok.into();
                        } else if tok == "internal" {
                            f.internal = true;
                        } else if tok == "ext" {
                            f.ext = true;
                        } else {
                            panic!("unknown field attribute `{tok}`: {}", ctx());
                        }
                    }
                    if f.qual == "RW" && f.set_role.is_none() {
                        f.set_role = Some("pool-admin".into());
                    }
                    class.fields.push(f);
                }
                "message" => {
                    let open = rest.find('(').unwrap_or_else(|| panic!("{}", ctx()));
                    let close = rest.find(") -> ").unwrap_or_else(|| panic!("{}", ctx()));
                    let name = rest[..open].to_owned();
                    let mut params = Vec::new();
                    let plist = &rest[open + 1..close];
                    let mut depth = 0;
                    let mut cur = String::new();
                    let mut pieces = Vec::new();
                    for c in plist.chars() {
                        match c {
                            '(' => depth += 1,
                            ')' => depth -= 1,
                            ',' if depth == 0 => {
                                pieces.push(std::mem::take(&mut cur));
                                continue;
                            }
                            _ => {}
                        }
                        cur.push(c);
                    }
                    if !cur.trim().is_empty() {
                        pieces.push(cur);
                    }
                    for p in pieces {
                        let (pn, pt) = p
                            .trim()
                            .split_once(':')
                            .unwrap_or_else(|| panic!("{}", ctx()));
                        let (pt, default) = match pt.split_once('=') {
                            Some((t, d)) => (t, Some(d.trim_matches('"').to_owned())),
                            None => (pt, None),
                        };
                        let optional = pn.ends_with('?');
                        params.push(Param {
                            name: pn.trim_end_matches('?').into(),
                            ty: parse_ty(pt),
                            default: if optional {
                                Some(default.unwrap_or_default())
                            } else {
                                None
                            },
                        });
                    }
                    let after = &rest[close + 5..];
                    let mut it = after.split_whitespace();
                    let result = parse_ty(it.next().unwrap_or_else(|| panic!("{}", ctx())));
                    let mut m = Message {
                        name,
                        params,
                        result,
                        role: "pool-admin".into(),
                        is_async: false,
                        lifecycle: String::new(),
                        ext: false,
                        errors: vec![],
                    };
                    for tok in it {
                        if let Some(r) = tok.strip_prefix("role=") {
                            m.role = r.into();
                        } else if tok == "async" {
                            m.is_async = true;
                        } else if tok == "depr" || tok == "proto" {
                            m.lifecycle = tok.into();
                        } else if tok == "ext" {
                            m.ext = true;
                        } else if let Some(e) = tok.strip_prefix("errors=") {
                            m.errors = e
                                .split(',')
                                .filter(|x| !x.is_empty())
                                .map(str::to_owned)
                                .collect();
                        } else {
                            panic!("unknown message attribute `{tok}`: {}", ctx());
                        }
                    }
                    class.messages.push(m);
                }
                _ => panic!("unknown keyword: {}", ctx()),
            }
        }
    }

    // Consistency checks: every enum used exists, relations point at a ref
    // field of the right class, names are unique.
    let class_names: BTreeSet<&str> = classes.iter().map(|c| c.name.as_str()).collect();
    fn check_ty(t: &Ty, enums: &BTreeMap<String, Vec<String>>, what: &str) {
        match t {
            Ty::Enum(e) => assert!(enums.contains_key(e), "{what}: unknown enum {e}"),
            Ty::Set(i) | Ty::Option(i) => check_ty(i, enums, what),
            Ty::Map(k, v) => {
                check_ty(k, enums, what);
                check_ty(v, enums, what)
            }
            _ => {}
        }
    }
    for c in &classes {
        let mut seen = BTreeSet::new();
        for f in &c.fields {
            assert!(seen.insert(&f.name), "{}.{} declared twice", c.name, f.name);
            check_ty(&f.ty, &enums, &format!("{}.{}", c.name, f.name));
            if let Some((rc, rf)) = &f.rel {
                assert!(
                    class_names.contains(rc.as_str()),
                    "{}.{}: rel to unknown class",
                    c.name,
                    f.name
                );
                let target = classes.iter().find(|x| &x.name == rc).expect("class");
                let tf = target.fields.iter().find(|x| &x.name == rf);
                let tf = tf.unwrap_or_else(|| {
                    panic!("{}.{}: rel to unknown field {rc}.{rf}", c.name, f.name)
                });
                assert!(
                    matches!(&tf.ty, Ty::Ref(x) if *x == c.name),
                    "{}.{}: {rc}.{rf} is not a ref to {}",
                    c.name,
                    f.name,
                    c.name
                );
            }
        }
        let mut seen = BTreeSet::new();
        for m in &c.messages {
            assert!(seen.insert(&m.name), "{}.{} declared twice", c.name, m.name);
            for p in &m.params {
                check_ty(&p.ty, &enums, &format!("{}.{}", c.name, m.name));
            }
        }
    }

    // Errors: `CODE param param | description`.
    let errs = std::fs::read_to_string(&err_path).expect("read errors spec");
    let mut errors = Vec::new();
    for line in errs.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (lhs, doc) = line.split_once('|').unwrap_or((line, ""));
        let mut it = lhs.split_whitespace();
        let code = it.next().expect("code").to_owned();
        let params: Vec<String> = it.map(str::to_owned).collect();
        errors.push((code, params, doc.trim().to_owned()));
    }

    let mut o = String::new();
    o.push_str("// @generated by crates/model/build.rs from spec/xenapi.spec and spec/errors.spec. Do not edit.\n\n");
    o.push_str("pub static ENUMS: &[EnumDef] = &[\n");
    for (n, vs) in &enums {
        let _ = writeln!(o, "    EnumDef {{ name: {n:?}, values: &{vs:?} }},");
    }
    o.push_str("];\n\n");
    o.push_str("pub static CLASSES: &[ClassDef] = &[\n");
    for c in &classes {
        let _ = writeln!(o, "    ClassDef {{\n        name: {:?},", c.name);
        let _ = writeln!(
            o,
            "        in_db: {}, persist: {}, events: {}, getters: {},",
            !c.flags.contains("nodb"),
            !c.flags.contains("nopersist") && !c.flags.contains("nodb"),
            !c.flags.contains("noevents") && !c.flags.contains("nodb"),
            !c.flags.contains("nogetters")
        );
        o.push_str("        implicit: &[");
        for (m, r) in &c.implicit {
            let _ = write!(o, "({m:?}, {}), ", role_expr(r));
        }
        o.push_str("],\n        fields: &[\n");
        for f in &c.fields {
            let qual = match f.qual.as_str() {
                "RO" => "Qual::RO",
                "RW" => "Qual::RW",
                "ctor" => "Qual::Ctor",
                q => panic!("bad qualifier {q}"),
            };
            let rel = match &f.rel {
                Some((a, b)) => format!("Some(({a:?}, {b:?}))"),
                None => "None".into(),
            };
            let _ = writeln!(
                o,
                "            FieldDef {{ name: {:?}, ty: {}, qual: {qual}, default: {}, set_role: {}, ops_role: {}, lifecycle: {}, internal: {}, extension: {}, rel: {rel} }},",
                f.name,
                ty_expr(&f.ty),
                opt_str(&f.default),
                f.set_role
                    .as_deref()
                    .map(|r| format!("Some({})", role_expr(r)))
                    .unwrap_or("None".into()),
                f.ops_role
                    .as_deref()
                    .map(|r| format!("Some({})", role_expr(r)))
                    .unwrap_or("None".into()),
                lifecycle_expr(&f.lifecycle),
                f.internal,
                f.ext,
            );
        }
        o.push_str("        ],\n        messages: &[\n");
        for m in &c.messages {
            o.push_str("            MessageDef { ");
            let _ = write!(o, "name: {:?}, params: &[", m.name);
            for p in &m.params {
                let _ = write!(
                    o,
                    "ParamDef {{ name: {:?}, ty: {}, default: {} }}, ",
                    p.name,
                    ty_expr(&p.ty),
                    opt_str(&p.default)
                );
            }
            let _ = writeln!(
                o,
                "], result: {}, role: {}, is_async: {}, lifecycle: {}, extension: {}, errors: &{:?} }},",
                ty_expr(&m.result),
                role_expr(&m.role),
                m.is_async,
                lifecycle_expr(&m.lifecycle),
                m.ext,
                m.errors
            );
        }
        o.push_str("        ],\n    },\n");
    }
    o.push_str("];\n\n");
    o.push_str("pub static ERRORS: &[ErrorDef] = &[\n");
    for (code, params, doc) in &errors {
        let _ = writeln!(
            o,
            "    ErrorDef {{ code: {code:?}, params: &{params:?}, doc: {doc:?} }},"
        );
    }
    o.push_str("];\n\n");
    o.push_str(
        "/// Class identifiers, in declaration order.\npub mod class {\n    use super::ClassId;\n",
    );
    for (i, c) in classes.iter().enumerate() {
        let _ = writeln!(
            o,
            "    pub const {}: ClassId = ClassId({i});",
            const_name(&c.name)
        );
    }
    o.push_str("}\n\n/// Field identifiers per class.\npub mod field {\n");
    for (i, c) in classes.iter().enumerate() {
        let _ = writeln!(
            o,
            "    pub mod {} {{\n        use crate::{{ClassId, FieldId}};",
            c.name.to_lowercase()
        );
        for (j, f) in c.fields.iter().enumerate() {
            let _ = writeln!(
                o,
                "        pub const {}: FieldId = FieldId {{ class: ClassId({i}), index: {j} }};",
                const_name(&f.name)
            );
        }
        o.push_str("    }\n");
    }
    o.push_str("}\n");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("out dir"));
    std::fs::write(out_dir.join("datamodel.rs"), o).expect("write generated");
    std::fs::write(out_dir.join("enums.rs"), enums_code(&enums)).expect("write generated");
    std::fs::write(out_dir.join("errors.rs"), errors_code(&errors)).expect("write generated");
    std::fs::write(out_dir.join("refs.rs"), args_code(&classes)).expect("write generated");
    let enum_values = format!(
        "enum_values!({});\n",
        enums
            .keys()
            .map(|e| camel(e))
            .collect::<Vec<_>>()
            .join(", ")
    );
    std::fs::write(out_dir.join("enum_values.rs"), enum_values).expect("write generated");
}

/// `vm_power_state` -> `VmPowerState`, `clean_shutdown` -> `CleanShutdown`,
/// `balance-slb` -> `BalanceSlb`, `IPv4` -> `IPv4`.
fn camel(s: &str) -> String {
    let mut out = String::new();
    for part in s.split(['_', '-']).filter(|p| !p.is_empty()) {
        let mut cs = part.chars();
        if let Some(c) = cs.next() {
            out.extend(c.to_uppercase());
            out.push_str(cs.as_str());
        }
    }
    if out.chars().next().is_some_and(|c| c.is_ascii_digit()) {
        out.insert(0, 'V');
    }
    out
}

/// One Rust enum per spec enum, with its wire names.
fn enums_code(enums: &BTreeMap<String, Vec<String>>) -> String {
    let mut o = String::from(
        "// @generated by crates/model/build.rs from spec/xenapi.spec. Do not edit.\n\n",
    );
    for (name, values) in enums {
        let ty = camel(name);
        let variants: Vec<String> = values.iter().map(|v| camel(v)).collect();
        let unique: BTreeSet<&String> = variants.iter().collect();
        assert_eq!(
            unique.len(),
            variants.len(),
            "enum {name}: two values share a Rust name"
        );
        let _ = writeln!(o, "/// The spec's `{name}`.");
        o.push_str("#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]\n");
        let _ = writeln!(o, "pub enum {ty} {{");
        for (v, r) in values.iter().zip(&variants) {
            let _ = writeln!(o, "    /// `{v}`\n    {r},");
        }
        o.push_str("}\n\n");
        let _ = writeln!(o, "impl {ty} {{");
        let _ = writeln!(o, "    pub const ALL: &'static [{ty}] = &[");
        for r in &variants {
            let _ = writeln!(o, "        {ty}::{r},");
        }
        o.push_str("    ];\n\n    /// The wire name.\n    pub const fn as_str(self) -> &'static str {\n        match self {\n");
        for (v, r) in values.iter().zip(&variants) {
            let _ = writeln!(o, "            {ty}::{r} => {v:?},");
        }
        o.push_str("        }\n    }\n\n    /// From the wire name (exact, as XAPI compares them).\n    pub fn parse(s: &str) -> Option<Self> {\n        match s {\n");
        for (v, r) in values.iter().zip(&variants) {
            let _ = writeln!(o, "            {v:?} => Some({ty}::{r}),");
        }
        o.push_str("            _ => None,\n        }\n    }\n}\n\n");
        let _ = writeln!(
            o,
            "impl std::fmt::Display for {ty} {{\n    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {{\n        f.write_str(self.as_str())\n    }}\n}}\n"
        );
    }
    o
}

/// A constant and a constructor per error code: `VM_BAD_POWER_STATE` and
/// `vm_bad_power_state(vm, expected, actual)`.
fn errors_code(errors: &[(String, Vec<String>, String)]) -> String {
    let mut o = String::from(
        "// @generated by crates/model/build.rs from spec/errors.spec. Do not edit.\n\n",
    );
    let keywords = [
        "type", "ref", "self", "fn", "mod", "use", "match", "in", "as", "box", "where", "move",
    ];
    for (code, params, doc) in errors {
        let _ = writeln!(o, "/// {doc}\npub const {code}: &str = {code:?};\n");
        let names: Vec<String> = params
            .iter()
            .map(|p| {
                let n = p.to_lowercase().replace('-', "_");
                if keywords.contains(&n.as_str()) {
                    format!("{n}_")
                } else {
                    n
                }
            })
            .collect();
        let args: Vec<String> = names
            .iter()
            .map(|n| format!("{n}: impl AsRef<str>"))
            .collect();
        let _ = writeln!(
            o,
            "/// `{code}`{}{}\npub fn {}({}) -> ApiError {{\n    ApiError {{\n        code: {code}.to_owned(),\n        params: vec![{}],\n    }}\n}}\n",
            if params.is_empty() { "" } else { " with " },
            params.join(", "),
            code.to_lowercase(),
            args.join(", "),
            names
                .iter()
                .map(|n| format!("{n}.as_ref().to_owned()"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    o
}

/// A Rust identifier for a spec name: lower case, keywords suffixed `_`.
fn rust_ident(s: &str) -> String {
    const KEYWORDS: &[&str] = &[
        "as", "break", "const", "continue", "crate", "else", "enum", "extern", "false", "fn",
        "for", "if", "impl", "in", "let", "loop", "match", "mod", "move", "mut", "pub", "ref",
        "return", "self", "static", "struct", "super", "trait", "true", "type", "unsafe", "use",
        "where", "while", "async", "await", "dyn", "abstract", "become", "box", "do", "final",
        "macro", "override", "priv", "typeof", "unsized", "virtual", "yield", "try", "gen",
    ];
    let n = s.to_lowercase().replace('-', "_");
    if KEYWORDS.contains(&n.as_str()) {
        format!("{n}_")
    } else {
        n
    }
}

/// The Rust type an argument of spec type `t` decodes to (a reference to a
/// class the spec does not declare stays a string).
fn arg_rust_ty(t: &Ty, known: &BTreeSet<&str>) -> String {
    match t {
        Ty::Ref(c) if !known.contains(c.as_str()) => "String".into(),
        Ty::Prim("int") => "i64".into(),
        Ty::Prim("float") => "f64".into(),
        Ty::Prim("bool") => "bool".into(),
        Ty::Prim(_) => "String".into(),
        Ty::Ref(c) => format!("Ref<crate::refs::classes::{}>", camel(c)),
        Ty::Enum(e) => format!("crate::enums::{}", camel(e)),
        Ty::Set(i) => match &**i {
            Ty::Set(_) | Ty::Map(..) | Ty::Option(_) | Ty::Record(_) => "Vec<Value>".into(),
            inner => format!("Vec<{}>", arg_rust_ty(inner, known)),
        },
        Ty::Map(k, v) if matches!(**k, Ty::Prim("string")) && matches!(**v, Ty::Prim("string")) => {
            "std::collections::BTreeMap<String, String>".into()
        }
        Ty::Map(..) | Ty::Option(_) | Ty::Record(_) => "Value".into(),
    }
}

/// A marker type per class for `Ref<C>`, and one argument struct per
/// message (`args::vm::Start`), decoded once from the checked parameters.
fn args_code(classes: &[Class]) -> String {
    let mut o = String::from(
        "// @generated by crates/model/build.rs from spec/xenapi.spec. Do not edit.\n\n",
    );
    o.push_str(
        "/// One marker type per class: `Ref<classes::VM>` names a VM.\npub mod classes {\n",
    );
    for c in classes {
        let ty = camel(&c.name);
        let _ = writeln!(
            o,
            "    /// The `{0}` class.\n    #[allow(clippy::upper_case_acronyms)]\n    #[derive(Debug)]\n    pub enum {ty} {{}}\n    impl super::Class for {ty} {{\n        const ID: crate::ClassId = crate::class::{1};\n    }}",
            c.name,
            const_name(&c.name)
        );
    }
    o.push_str("}\n\n");
    let known: BTreeSet<&str> = classes.iter().map(|c| c.name.as_str()).collect();
    let args = &mut String::new();
    args.push_str("// @generated by crates/model/build.rs from spec/xenapi.spec. Do not edit.\n\n");
    for c in classes {
        if c.messages.is_empty() {
            continue;
        }
        let _ = writeln!(
            args,
            "/// The arguments of `{}`'s messages.\npub mod {} {{\n    #[allow(unused_imports)]\n    use crate::args::{{Args, FromValue, IntoValue, Params}};\n    #[allow(unused_imports)]\n    use crate::refs::Ref;\n    #[allow(unused_imports)]\n    use crate::{{ApiError, Value}};\n",
            c.name,
            c.name.to_lowercase()
        );
        for m in &c.messages {
            let ty = camel(&m.name);
            let wire = format!("{}.{}", c.name, m.name);
            let _ = writeln!(
                args,
                "    /// `{wire}` (after the session).\n    #[derive(Debug, Clone, PartialEq)]\n    pub struct {ty} {{"
            );
            for p in &m.params {
                let _ = writeln!(
                    args,
                    "        pub {}: {},",
                    rust_ident(&p.name),
                    arg_rust_ty(&p.ty, &known)
                );
            }
            args.push_str("    }\n\n");
            let _ = writeln!(
                args,
                "    impl Args for {ty} {{\n        const WIRE: &'static str = {wire:?};\n        #[allow(unused_variables, unused_mut)]\n        fn from_params(p: Vec<Value>) -> Result<Self, ApiError> {{\n            let mut p = Params::new(p);\n            Ok({ty} {{"
            );
            for p in &m.params {
                let _ = writeln!(
                    args,
                    "                {}: p.next({:?})?,",
                    rust_ident(&p.name),
                    p.name
                );
            }
            let _ = writeln!(
                args,
                "            }})\n        }}\n        fn into_params(self) -> Vec<Value> {{\n            vec![{}]\n        }}\n    }}\n",
                m.params
                    .iter()
                    .map(|p| format!("self.{}.into_value()", rust_ident(&p.name)))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            // A message on one object is made from its reference.
            if let [p] = m.params.as_slice()
                && let Ty::Ref(target) = &p.ty
                && known.contains(target.as_str())
            {
                let _ = writeln!(
                    args,
                    "    impl From<Ref<crate::refs::classes::{0}>> for {ty} {{\n        fn from(r: Ref<crate::refs::classes::{0}>) -> Self {{\n            {ty} {{ {1}: r }}\n        }}\n    }}\n",
                    camel(target),
                    rust_ident(&p.name)
                );
            }
        }
        args.push_str("}\n\n");
    }
    o.push_str("\n");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("out dir"));
    std::fs::write(out_dir.join("args.rs"), args.as_str()).expect("write generated");
    o
}
