//! The API reference page (docs/api-reference.md), rendered from the same
//! tables as everything else. A test fails when the checked-in page drifts.

use crate::schema::{CLASSES, ENUMS, ERRORS, Lifecycle, Qual, Ty};
use std::fmt::Write as _;

/// A type as the XenAPI documentation writes it (`VM ref set`,
/// `(string -> string) map`, `enum vm_power_state`).
pub fn type_name(ty: &Ty) -> String {
    match ty {
        Ty::String => "string".into(),
        Ty::Int => "int".into(),
        Ty::Float => "float".into(),
        Ty::Bool => "bool".into(),
        Ty::DateTime => "datetime".into(),
        Ty::Ref(c) => format!("{c} ref"),
        Ty::Enum(e) => format!("enum {e}"),
        Ty::Set(t) => format!("{} set", type_name(t)),
        Ty::Map(k, v) => format!("({} -> {}) map", type_name(k), type_name(v)),
        Ty::Option(t) => format!("{} option", type_name(t)),
        Ty::Record(c) => format!("{c} record"),
        Ty::Void => "void".into(),
        Ty::EventBatch => "event batch".into(),
    }
}

fn qual(q: Qual) -> &'static str {
    match q {
        Qual::RO => "RO/runtime",
        Qual::Ctor => "RO/constructor",
        Qual::RW => "RW",
    }
}

fn notes(lifecycle: Lifecycle, extension: bool) -> String {
    let mut n = Vec::new();
    if extension {
        n.push("Corral extension");
    }
    match lifecycle {
        Lifecycle::Deprecated => n.push("deprecated"),
        Lifecycle::Prototype => n.push("prototype"),
        Lifecycle::Published => {}
    }
    n.join(", ")
}

fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

/// The whole page.
pub fn markdown() -> String {
    let mut o = String::new();
    o.push_str("# Corral XenAPI reference\n\n");
    o.push_str(
        "Generated from `crates/model/spec/xenapi.spec` and `spec/errors.spec`; do not edit.\n\
         Regenerate with `CORRAL_UPDATE_DOCS=1 cargo test -p corral-model --test reference`.\n\n\
         Every class with a database table also has the generic messages `get_all`, \
         `get_all_records`, `get_all_records_where`, `get_record`, `get_by_uuid`, \
         `get_by_name_label` (when it has `name_label`), `get_<field>` for each field, \
         `set_<field>` for RW fields, `add_to_<field>`/`remove_from_<field>` for RW maps and \
         `add_<field>`/`remove_<field>` for RW sets, with the roles listed.\n\n",
    );
    o.push_str("## Classes\n\n");
    for c in CLASSES {
        let _ = write!(o, "[{0}](#class-{1}) ", c.name, c.name.to_lowercase());
    }
    o.push_str("\n\n");
    for c in CLASSES {
        let _ = writeln!(o, "## Class: {}\n", c.name);
        let mut flags = Vec::new();
        if !c.in_db {
            flags.push("not stored");
        } else if !c.persist {
            flags.push("volatile (not kept across restarts)");
        }
        if !c.events {
            flags.push("no events");
        }
        if !flags.is_empty() {
            let _ = writeln!(o, "*{}*\n", flags.join("; "));
        }
        if !c.implicit.is_empty() {
            o.push_str("Implicit messages: ");
            let items: Vec<String> = c
                .implicit
                .iter()
                .map(|(m, r)| format!("`{m}` ({})", r.name()))
                .collect();
            o.push_str(&items.join(", "));
            o.push_str("\n\n");
        }
        if !c.fields.is_empty() {
            o.push_str("| field | type | qualifier | default | set role | notes |\n|---|---|---|---|---|---|\n");
            for f in c.fields.iter().filter(|f| !f.internal) {
                let mut n = notes(f.lifecycle, f.extension);
                if let Some((cc, cf)) = f.rel {
                    if !n.is_empty() {
                        n.push_str(", ");
                    }
                    let _ = write!(n, "derived from {cc}.{cf}");
                }
                let _ = writeln!(
                    o,
                    "| `{}` | {} | {} | {} | {} | {} |",
                    f.name,
                    cell(&type_name(&f.ty)),
                    qual(f.qual),
                    f.default
                        .map(|d| if d.is_empty() {
                            "`\"\"`".to_owned()
                        } else {
                            format!("`{}`", cell(d))
                        })
                        .unwrap_or_default(),
                    f.set_role.map(|r| r.name()).unwrap_or(""),
                    n
                );
            }
            o.push('\n');
        }
        if !c.messages.is_empty() {
            o.push_str("| message | parameters | result | role | async | errors | notes |\n|---|---|---|---|---|---|---|\n");
            for m in c.messages {
                let params: Vec<String> = m
                    .params
                    .iter()
                    .map(|p| match p.default {
                        Some(d) => format!("{} {} = `{}`", type_name(&p.ty), p.name, d),
                        None => format!("{} {}", type_name(&p.ty), p.name),
                    })
                    .collect();
                let _ = writeln!(
                    o,
                    "| `{}` | {} | {} | {} | {} | {} | {} |",
                    m.name,
                    cell(&params.join(", ")),
                    cell(&type_name(&m.result)),
                    m.role.name(),
                    if m.is_async { "yes" } else { "" },
                    m.errors.join(", "),
                    notes(m.lifecycle, m.extension)
                );
            }
            o.push('\n');
        }
    }
    o.push_str("## Enums\n\n| enum | values |\n|---|---|\n");
    for e in ENUMS {
        let _ = writeln!(o, "| `{}` | {} |", e.name, e.values.join(", "));
    }
    o.push_str("\n## Errors\n\n| code | parameters | meaning |\n|---|---|---|\n");
    for e in ERRORS {
        let _ = writeln!(
            o,
            "| `{}` | {} | {} |",
            e.code,
            e.params.join(", "),
            cell(e.doc)
        );
    }
    o
}
