//! Per-class field tables and record rendering.

use crate::cli::args::parse_bool;
use crate::cli::context::{CliCtx, CliError, text};
use corral_model::schema::{ClassId, FieldDef, Ty};
use corral_model::value::format_float;
use corral_model::{ApiError, NULL_REF, Value};

/// A CLI class: a datamodel class plus a fixed filter (`template` is VM
/// with `is_a_template=true`).
#[derive(Clone, Copy)]
pub struct CliClass {
    pub name: &'static str,
    pub class: ClassId,
    pub filter: &'static [(&'static str, &'static str)],
    pub default_params: &'static [&'static str],
}

/// The CLI classes: every database class with `get_all_records`, named as xe
/// names them.
pub fn cli_classes() -> Vec<CliClass> {
    let mut out = Vec::new();
    for c in ClassId::all() {
        let def = c.def();
        if !def.in_db || c.implicit_role("get_all_records").is_none() {
            continue;
        }
        let name: &'static str =
            Box::leak(def.name.to_lowercase().replace('_', "-").into_boxed_str());
        let (filter, params): (&'static [(&str, &str)], &'static [&str]) = match def.name {
            "VM" => (
                &[("is-a-template", "false"), ("is-control-domain", "false")],
                &["uuid", "name-label", "power-state"],
            ),
            "host" => (&[], &["uuid", "name-label", "name-description"]),
            "pool" => (
                &[],
                &[
                    "uuid",
                    "name-label",
                    "name-description",
                    "master",
                    "default-SR",
                ],
            ),
            "SR" => (
                &[],
                &[
                    "uuid",
                    "name-label",
                    "name-description",
                    "host",
                    "type",
                    "content-type",
                ],
            ),
            "PBD" => (
                &[],
                &[
                    "uuid",
                    "host-uuid",
                    "sr-uuid",
                    "device-config",
                    "currently-attached",
                ],
            ),
            "VDI" => (
                &[],
                &[
                    "uuid",
                    "name-label",
                    "name-description",
                    "virtual-size",
                    "read-only",
                    "sharable",
                    "sr-uuid",
                ],
            ),
            "VBD" => (&[], &["uuid", "vm-uuid", "vdi-uuid", "device", "empty"]),
            "VIF" => (&[], &["uuid", "device", "vm-uuid", "network-uuid"]),
            "network" => (&[], &["uuid", "name-label", "name-description", "bridge"]),
            "PIF" => (
                &[],
                &[
                    "uuid",
                    "device",
                    "VLAN",
                    "MAC",
                    "network-uuid",
                    "currently-attached",
                    "host-uuid",
                ],
            ),
            "Bond" => (&[], &["uuid", "master", "slaves"]),
            "VLAN" => (&[], &["uuid", "tagged-PIF", "untagged-PIF", "tag"]),
            "task" => (
                &[],
                &[
                    "uuid",
                    "name-label",
                    "name-description",
                    "status",
                    "progress",
                ],
            ),
            "subject" => (
                &[],
                &["uuid", "subject-identifier", "other-config", "roles"],
            ),
            "console" => (&[], &["uuid", "vm-uuid", "protocol", "location"]),
            "message" | "user" => (&[], &[]),
            _ => (&[], &["uuid", "name-label", "name-description"]),
        };
        out.push(CliClass {
            name,
            class: c,
            filter,
            default_params: params,
        });
        if def.name == "VM" {
            out.push(CliClass {
                name: "template",
                class: c,
                filter: &[("is-a-template", "true")],
                default_params: &["uuid", "name-label", "name-description"],
            });
            out.push(CliClass {
                name: "snapshot",
                class: c,
                filter: &[("is-a-snapshot", "true")],
                default_params: &["uuid", "name-label", "name-description"],
            });
        }
    }
    out
}

/// The xe name of a field: hyphens for underscores, and `<x>-uuid` for a
/// pointer to the class `x` (`PBD.host` → `host-uuid`).
pub fn cli_field_name(f: &FieldDef) -> String {
    const KEEP: &[&str] = &[
        "cpu_info",
        "subtask_of",
        "error_info",
        "allowed_operations",
        "current_operations",
        "qos_algorithm_type",
        "qos_algorithm_params",
        "qos_supported_algorithms",
        "io_read_kbs",
        "io_write_kbs",
    ];
    if KEEP.contains(&f.name) && !matches!(f.name, "allowed_operations" | "current_operations") {
        return f.name.to_owned();
    }
    if let Ty::Ref(target) = f.ty {
        if target.eq_ignore_ascii_case(f.name) {
            return format!("{}-uuid", f.name.to_lowercase());
        }
    }
    f.name.replace('_', "-")
}

pub(crate) fn tag(f: &FieldDef) -> &'static str {
    match f.ty {
        Ty::Set(_) => {
            if f.ops_role.is_some() {
                "SRW"
            } else {
                "SRO"
            }
        }
        Ty::Map(..) => {
            if f.ops_role.is_some() || f.set_role.is_some() {
                "MRW"
            } else {
                "MRO"
            }
        }
        _ => {
            if f.set_role.is_some() {
                " RW"
            } else {
                " RO"
            }
        }
    }
}

impl CliCtx {
    pub(crate) fn uuid_of(&self, r: &str) -> String {
        if r == NULL_REF || r.is_empty() {
            return r.to_owned();
        }
        let st = self.server.db.read();
        for c in ClassId::all().filter(|c| c.def().in_db) {
            if st.exists(c, r) {
                if let Some(u) = c.field("uuid").and_then(|f| st.get_str(f, r)) {
                    return u;
                }
            }
        }
        "<not in database>".into()
    }

    pub(crate) fn render(&self, f: &FieldDef, v: &Value) -> String {
        let scalar = |ty: &Ty, v: &Value| -> String {
            match (ty, v) {
                (Ty::Ref(_), Value::String(r)) => self.uuid_of(r),
                (Ty::Float, Value::Float(x)) => format!("{x:.3}"),
                (_, Value::Float(x)) => format_float(*x),
                _ => v.db_string(),
            }
        };
        match (&f.ty, v) {
            (Ty::Set(inner), Value::Array(items)) => items
                .iter()
                .map(|i| scalar(inner, i))
                .collect::<Vec<_>>()
                .join("; "),
            (Ty::Map(kt, vt), Value::Struct(m)) => m
                .iter()
                .map(|(k, x)| {
                    format!(
                        "{}: {}",
                        scalar(kt, &Value::String(k.clone())),
                        scalar(vt, x)
                    )
                })
                .collect::<Vec<_>>()
                .join("; "),
            (Ty::Enum("vm_power_state"), Value::String(s)) => s.to_lowercase(),
            (ty, v) => scalar(ty, v),
        }
    }

    /// The record as (cli name, tag, rendered value), in field order.
    pub(crate) fn cli_record(
        &self,
        cc: &CliClass,
        rec: &Value,
    ) -> Vec<(String, &'static str, String)> {
        let mut out = Vec::new();
        for f in cc.class.def().fields.iter().filter(|f| !f.internal) {
            if let Some(v) = rec.member(f.name) {
                out.push((cli_field_name(f), tag(f), self.render(f, v)));
            }
        }
        out
    }

    pub(crate) async fn records(&self, cc: &CliClass) -> Result<Vec<(String, Value)>, CliError> {
        let all = self
            .call(
                &format!("{}.get_all_records_where", cc.class.name()),
                vec![Value::str("true")],
            )
            .await?;
        let mut out = Vec::new();
        for (r, rec) in all.as_struct().map(<[_]>::to_vec).unwrap_or_default() {
            let cr = self.cli_record(cc, &rec);
            if cc
                .filter
                .iter()
                .all(|(k, v)| cr.iter().any(|(n, _, val)| n == k && val == v))
            {
                out.push((r, rec));
            }
        }
        Ok(out)
    }

    pub(crate) fn matches(
        &self,
        cc: &CliClass,
        rec: &Value,
        filters: &[(String, String)],
    ) -> Result<bool, CliError> {
        let cr = self.cli_record(cc, rec);
        for (k, want) in filters {
            let (name, sub) = match k.split_once(':') {
                Some((n, s)) => (n, Some(s)),
                None => (k.as_str(), None),
            };
            let Some(f) = cc
                .class
                .def()
                .fields
                .iter()
                .find(|f| cli_field_name(f) == name)
            else {
                return text(format!(
                    "Parameter '{name}' is not a field of the {} class. Failed to select {} for operation.",
                    cc.class.name(),
                    cc.class.name()
                ));
            };
            let v = rec.member(f.name).cloned().unwrap_or(Value::Nil);
            let ok = match (sub, &f.ty) {
                (Some("contains"), Ty::Set(_)) => v
                    .as_array()
                    .unwrap_or_default()
                    .iter()
                    .any(|x| x.db_string() == *want || self.uuid_of(&x.db_string()) == *want),
                (Some(key), Ty::Map(..)) => {
                    v.member(key).map(|x| x.db_string()) == Some(want.clone())
                }
                _ => {
                    let shown = cr
                        .iter()
                        .find(|(n, _, _)| n == name)
                        .map(|(_, _, s)| s.clone())
                        .unwrap_or_default();
                    if name == "MAC" {
                        shown.eq_ignore_ascii_case(want)
                    } else {
                        shown == *want
                    }
                }
            };
            if !ok {
                return Ok(false);
            }
        }
        Ok(true)
    }

    pub(crate) fn field_for(
        &self,
        cc: &CliClass,
        name: &str,
    ) -> Result<&'static FieldDef, CliError> {
        cc.class
            .def()
            .fields
            .iter()
            .filter(|f| !f.internal)
            .find(|f| cli_field_name(f) == name)
            .ok_or_else(|| CliError::Text(format!("Unknown field '{name}'")))
    }

    /// Converts xe text to a wire value of the field's type.
    pub(crate) fn value_of(
        &self,
        f: &FieldDef,
        ty: &Ty,
        s: &str,
        name: &str,
    ) -> Result<Value, CliError> {
        Ok(match ty {
            Ty::Int => Value::Int(
                s.trim()
                    .parse()
                    .map_err(|_| CliError::Text(format!("Parameter {name} must be an integer")))?,
            ),
            Ty::Float => Value::Float(
                s.trim()
                    .parse()
                    .map_err(|_| CliError::Text(format!("Parameter {name} must be a number")))?,
            ),
            Ty::Bool => Value::Bool(parse_bool(s).ok_or_else(|| {
                CliError::Text(format!(
                    "Parameter {name} must be a boolean (true or false)"
                ))
            })?),
            Ty::Ref(target) => {
                if s.starts_with("OpaqueRef:") || s.is_empty() {
                    Value::str(if s.is_empty() { NULL_REF } else { s })
                } else {
                    let c = ClassId::by_name(target)
                        .ok_or_else(|| CliError::Text(format!("Cannot resolve {s}")))?;
                    let st = self.server.db.read();
                    Value::String(
                        st.by_uuid(c, s)
                            .cloned()
                            .ok_or_else(|| CliError::Api(ApiError::uuid_invalid(target, s)))?,
                    )
                }
            }
            Ty::Set(inner) => Value::Array(
                s.split(',')
                    .map(str::trim)
                    .filter(|x| !x.is_empty())
                    .map(|x| self.value_of(f, inner, x, name))
                    .collect::<Result<_, _>>()?,
            ),
            _ => Value::str(s),
        })
    }
}
