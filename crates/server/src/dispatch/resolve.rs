//! Wire names to handlers, and system.listMethods.

use crate::context::{Handler, Server};
use corral_model::Value;
use corral_model::schema::{CLASSES, ClassId, FieldId, Role, Ty};

/// What a wire name resolved to.
#[derive(Clone)]
pub(crate) struct Resolved {
    pub(crate) wire: String,
    pub(crate) class: ClassId,
    pub(crate) params: Vec<(&'static str, Ty, Option<&'static str>)>,
    pub(crate) role: Role,
    pub(crate) is_async: bool,
    pub(crate) session: bool,
    pub(crate) kind: Kind,
}

#[derive(Clone)]
pub(crate) enum Kind {
    Custom(Handler),
    GetAll,
    GetAllRecords,
    GetAllRecordsWhere,
    GetAllWhere,
    GetRecord,
    GetByUuid,
    GetByNameLabel,
    Create,
    Destroy,
    Get(FieldId),
    Set(FieldId),
    MapAdd(FieldId),
    MapRemove(FieldId),
    SetAdd(FieldId),
    SetRemove(FieldId),
}

impl Server {
    /// `system.listMethods`: every wire name that has an implementation.
    pub fn list_methods(&self) -> Value {
        let mut out = Vec::new();
        for c in ClassId::all() {
            let def = c.def();
            for m in def.messages {
                let wire = format!("{}.{}", def.name, m.name);
                if self.handlers.contains_key(&wire) {
                    out.push(Value::String(wire));
                }
            }
            if !def.in_db {
                continue;
            }
            for (m, _) in def.implicit {
                out.push(Value::String(format!("{}.{m}", def.name)));
            }
            if def.implicit.iter().any(|(m, _)| *m == "get_all_records") {
                out.push(Value::String(format!("{}.get_all_records_where", def.name)));
                out.push(Value::String(format!("{}.get_all_where", def.name)));
            }
            for f in def.fields.iter().filter(|f| !f.internal) {
                if def.getters {
                    out.push(Value::String(format!("{}.get_{}", def.name, f.name)));
                }
                if f.set_role.is_some()
                    && !self
                        .handlers
                        .contains_key(&format!("{}.set_{}", def.name, f.name))
                {
                    out.push(Value::String(format!("{}.set_{}", def.name, f.name)));
                }
                if f.ops_role.is_some() {
                    match f.ty {
                        Ty::Map(..) => {
                            out.push(Value::String(format!("{}.add_to_{}", def.name, f.name)));
                            out.push(Value::String(format!(
                                "{}.remove_from_{}",
                                def.name, f.name
                            )));
                        }
                        Ty::Set(_) => {
                            out.push(Value::String(format!("{}.add_{}", def.name, f.name)));
                            out.push(Value::String(format!("{}.remove_{}", def.name, f.name)));
                        }
                        _ => {}
                    }
                }
            }
        }
        Value::Array(out)
    }

    pub(crate) fn resolve(&self, wire: &str) -> Option<Resolved> {
        let (cname, mname) = match wire.split_once('.') {
            Some(x) => x,
            None => {
                // The `<Class>_<message>` form.
                let c = CLASSES
                    .iter()
                    .filter(|c| wire.starts_with(&format!("{}_", c.name)))
                    .max_by_key(|c| c.name.len())?;
                (c.name, &wire[c.name.len() + 1..])
            }
        };
        let class = ClassId::by_name(cname)?;
        let def = class.def();
        let self_param = |c: &'static str| ("self", Ty::Ref(c), None);
        let mk = |params, role, is_async, kind| Resolved {
            wire: format!("{}.{mname}", def.name),
            class,
            params,
            role,
            is_async,
            session: true,
            kind,
        };
        if let Some(m) = class.message(mname) {
            let h = self
                .handlers
                .get(&format!("{}.{}", def.name, m.name))?
                .clone();
            let mut r = mk(
                m.params.iter().map(|p| (p.name, p.ty, p.default)).collect(),
                m.role,
                m.is_async,
                Kind::Custom(h),
            );
            r.session = !matches!(
                (def.name, m.name),
                ("session", "login_with_password") | ("session", "slave_local_login_with_password")
            );
            return Some(r);
        }
        if !def.in_db {
            return None;
        }
        let name = def.name;
        let has = |m: &str| class.implicit_role(m);
        let role_of = |m: &str| has(m).unwrap_or(Role::ReadOnly);
        let r = match mname {
            "get_all" if has("get_all").is_some() => {
                mk(vec![], role_of("get_all"), false, Kind::GetAll)
            }
            "get_all_records" if has("get_all_records").is_some() => mk(
                vec![],
                role_of("get_all_records"),
                false,
                Kind::GetAllRecords,
            ),
            "get_all_records_where" if has("get_all_records").is_some() => mk(
                vec![("expr", Ty::String, None)],
                Role::ReadOnly,
                false,
                Kind::GetAllRecordsWhere,
            ),
            "get_all_where" if has("get_all_records").is_some() => mk(
                vec![("expr", Ty::String, None)],
                Role::ReadOnly,
                false,
                Kind::GetAllWhere,
            ),
            "get_record" if has("get_record").is_some() => mk(
                vec![self_param(name)],
                role_of("get_record"),
                false,
                Kind::GetRecord,
            ),
            "get_by_uuid" if has("get_by_uuid").is_some() => mk(
                vec![("uuid", Ty::String, None)],
                role_of("get_by_uuid"),
                false,
                Kind::GetByUuid,
            ),
            "get_by_name_label" if has("get_by_name_label").is_some() => mk(
                vec![("label", Ty::String, None)],
                role_of("get_by_name_label"),
                false,
                Kind::GetByNameLabel,
            ),
            // Classes whose create/destroy touch more than the database
            // (PBD, VDI, VBD) have hand-written handlers.
            "create" if has("create").is_some() => mk(
                vec![("args", Ty::Record(name), None)],
                role_of("create"),
                true,
                match self.handlers.get(&format!("{name}.create")) {
                    Some(h) => Kind::Custom(h.clone()),
                    None => Kind::Create,
                },
            ),
            "destroy" if has("destroy").is_some() => mk(
                vec![self_param(name)],
                role_of("destroy"),
                true,
                match self.handlers.get(&format!("{name}.destroy")) {
                    Some(h) => Kind::Custom(h.clone()),
                    None => Kind::Destroy,
                },
            ),
            _ => {
                let field_op = |prefix: &str| -> Option<FieldId> {
                    let f = class.field(mname.strip_prefix(prefix)?)?;
                    if f.def().internal { None } else { Some(f) }
                };
                if let (true, Some(f)) = (def.getters, field_op("get_")) {
                    mk(vec![self_param(name)], Role::ReadOnly, false, Kind::Get(f))
                } else if let Some(f) = field_op("set_").filter(|f| f.def().set_role.is_some()) {
                    let d = f.def();
                    // A setter with checks of its own (VBD.set_mode).
                    let kind = match self.handlers.get(&format!("{name}.set_{}", d.name)) {
                        Some(h) => Kind::Custom(h.clone()),
                        None => Kind::Set(f),
                    };
                    mk(
                        vec![self_param(name), ("value", d.ty, None)],
                        d.set_role.unwrap_or(Role::PoolAdmin),
                        false,
                        kind,
                    )
                } else if let Some(f) = field_op("add_to_").filter(|f| f.def().ops_role.is_some()) {
                    let Ty::Map(k, v) = f.def().ty else {
                        return None;
                    };
                    mk(
                        vec![self_param(name), ("key", *k, None), ("value", *v, None)],
                        f.def().ops_role.unwrap_or(Role::PoolAdmin),
                        false,
                        Kind::MapAdd(f),
                    )
                } else if let Some(f) =
                    field_op("remove_from_").filter(|f| f.def().ops_role.is_some())
                {
                    let Ty::Map(k, _) = f.def().ty else {
                        return None;
                    };
                    mk(
                        vec![self_param(name), ("key", *k, None)],
                        f.def().ops_role.unwrap_or(Role::PoolAdmin),
                        false,
                        Kind::MapRemove(f),
                    )
                } else if let Some(f) = field_op("add_").filter(|f| f.def().ops_role.is_some()) {
                    let Ty::Set(e) = f.def().ty else { return None };
                    mk(
                        vec![self_param(name), ("value", *e, None)],
                        f.def().ops_role.unwrap_or(Role::PoolAdmin),
                        false,
                        Kind::SetAdd(f),
                    )
                } else if let Some(f) = field_op("remove_").filter(|f| f.def().ops_role.is_some()) {
                    let Ty::Set(e) = f.def().ty else { return None };
                    mk(
                        vec![self_param(name), ("value", *e, None)],
                        f.def().ops_role.unwrap_or(Role::PoolAdmin),
                        false,
                        Kind::SetRemove(f),
                    )
                } else {
                    return None;
                }
            }
        };
        Some(r)
    }
}
