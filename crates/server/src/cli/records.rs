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

/// xe's record table: the first key left-aligned, the others right-aligned,
/// all padded to 4 + the longest key with its tag.
pub fn table(cols: &[(String, &str, String)]) -> String {
    let keys: Vec<String> = cols.iter().map(|(n, t, _)| format!("{n} ({t})")).collect();
    let w = 4 + keys.iter().map(String::len).max().unwrap_or(0);
    let mut s = String::new();
    for (i, (k, (_, _, v))) in keys.iter().zip(cols).enumerate() {
        if i == 0 {
            s.push_str(&format!("{k:<w$}: {v}\n"));
        } else {
            s.push_str(&format!("{k:>w$}: {v}\n"));
        }
    }
    s
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
    /// A field's value as xe prints it: references as uuids (asked of the
    /// API), sets joined with `; `, maps as `k: v; ...`.
    pub(crate) async fn render(&self, f: &FieldDef, v: &Value) -> Result<String, CliError> {
        Ok(match (&f.ty, v) {
            (Ty::Set(inner), Value::Array(items)) => {
                let mut shown = Vec::with_capacity(items.len());
                for i in items {
                    shown.push(self.scalar(inner, i).await?);
                }
                shown.join("; ")
            }
            (Ty::Map(kt, vt), Value::Struct(m)) => {
                let mut shown = Vec::with_capacity(m.len());
                for (k, x) in m {
                    let k = self.scalar(kt, &Value::String(k.clone())).await?;
                    shown.push(format!("{k}: {}", self.scalar(vt, x).await?));
                }
                shown.join("; ")
            }
            (Ty::Enum("vm_power_state"), Value::String(s)) => s.to_lowercase(),
            (ty, v) => self.scalar(ty, v).await?,
        })
    }

    async fn scalar(&self, ty: &Ty, v: &Value) -> Result<String, CliError> {
        Ok(match (ty, v) {
            (Ty::Ref(target), Value::String(r)) => match ClassId::by_name(target) {
                Some(c) => self.uuid(c, r).await?,
                None => r.clone(),
            },
            (Ty::Float, Value::Float(x)) => format!("{x:.3}"),
            (_, Value::Float(x)) => format_float(*x),
            _ => v.db_string(),
        })
    }

    /// The record's fields that `shown` picks (by xe name) as (xe name,
    /// tag, rendered value), in field order.
    pub(crate) async fn cli_record(
        &self,
        cc: &CliClass,
        rec: &Value,
        shown: impl Fn(&str) -> bool,
    ) -> Result<Vec<(String, &'static str, String)>, CliError> {
        let mut out = Vec::new();
        for f in cc.class.def().fields.iter().filter(|f| !f.internal) {
            let name = cli_field_name(f);
            if !shown(&name) {
                continue;
            }
            if let Some(v) = rec.member(f.name) {
                out.push((name, tag(f), self.render(f, v).await?));
            }
        }
        // xe shows a VIF's traffic with the VIF (XAPI reads it from RRDs;
        // Corral from the VIF's VIF_metrics).
        if cc.class == corral_model::schema::class::VIF {
            for key in ["io_read_kbs", "io_write_kbs"] {
                if shown(key) {
                    out.push((key.to_owned(), " RO", self.vif_metric(rec, key).await));
                }
            }
        }
        Ok(out)
    }

    /// One figure of the VIF's VIF_metrics (`0.000` while it has none).
    async fn vif_metric(&self, rec: &Value, key: &str) -> String {
        let metrics = rec
            .member("metrics")
            .and_then(Value::as_str)
            .unwrap_or(NULL_REF);
        if metrics == NULL_REF {
            return "0.000".into();
        }
        match self.get("VIF_metrics", metrics, key).await {
            Ok(Value::Float(x)) => format!("{x:.3}"),
            _ => "0.000".into(),
        }
    }

    /// The class's records that pass its fixed filter.
    pub(crate) async fn records(&self, cc: &CliClass) -> Result<Vec<(String, Value)>, CliError> {
        let all = self
            .call(
                &format!("{}.get_all_records_where", cc.class.name()),
                vec![Value::str("true")],
            )
            .await?;
        let mut out = Vec::new();
        for (r, rec) in all.as_struct().map(<[_]>::to_vec).unwrap_or_default() {
            let cr = self
                .cli_record(cc, &rec, |n| cc.filter.iter().any(|(k, _)| *k == n))
                .await?;
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

    /// Whether the record passes `field=value` filters as xe reads them
    /// (`field:key=` for a map's key, `field:contains=` for a set).
    pub(crate) async fn matches(
        &self,
        cc: &CliClass,
        rec: &Value,
        filters: &[(String, String)],
    ) -> Result<bool, CliError> {
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
            let v = rec.member(f.name);
            let ok = match (sub, &f.ty) {
                (Some("contains"), Ty::Set(inner)) => {
                    let mut found = false;
                    for x in v.and_then(Value::as_array).unwrap_or_default() {
                        if x.db_string() == *want || self.scalar(inner, x).await? == *want {
                            found = true;
                            break;
                        }
                    }
                    found
                }
                (Some(key), Ty::Map(..)) => {
                    v.and_then(|m| m.member(key)).map(|x| x.db_string()) == Some(want.clone())
                }
                _ => {
                    let shown = match v {
                        Some(v) if !f.internal => self.render(f, v).await?,
                        _ => String::new(),
                    };
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

    /// Converts xe text to a wire value of the field's type; a uuid where
    /// a reference goes is looked up (`<class>.get_by_uuid`).
    pub(crate) async fn value_of(&self, ty: &Ty, s: &str, name: &str) -> Result<Value, CliError> {
        match ty {
            Ty::Set(inner) => {
                let mut items = Vec::new();
                for x in s.split(',').map(str::trim).filter(|x| !x.is_empty()) {
                    items.push(self.scalar_value(inner, x, name).await?);
                }
                Ok(Value::Array(items))
            }
            ty => self.scalar_value(ty, s, name).await,
        }
    }

    async fn scalar_value(&self, ty: &Ty, s: &str, name: &str) -> Result<Value, CliError> {
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
            Ty::Ref(_) if s.is_empty() => Value::str(NULL_REF),
            Ty::Ref(_) if s.starts_with("OpaqueRef:") => Value::str(s),
            Ty::Ref(target) => {
                let c = ClassId::by_name(target)
                    .ok_or_else(|| CliError::Text(format!("Cannot resolve {s}")))?;
                match self.find_uuid(c.name(), s).await? {
                    Some(r) => Value::String(r),
                    None => return Err(CliError::Api(ApiError::uuid_invalid(target, s))),
                }
            }
            _ => Value::str(s),
        })
    }
}
