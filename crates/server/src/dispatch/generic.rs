//! The implicit messages every class has: get_*, set_*, add_to_*, get_all_records and the rest.

use crate::context::Server;
use crate::core::call::{ApiResult, db_err, uuid_field};
use crate::core::records::{check_refs, create_fields};
use crate::dispatch::resolve::Kind;
use corral_db::{Txn, check_field};
use corral_model::errors;
use corral_model::schema::{ClassId, class, field};
use corral_model::{ApiError, Value, new_ref};

impl Server {
    pub(crate) fn generic(&self, c: ClassId, kind: &Kind, mut p: Vec<Value>) -> ApiResult {
        let take_str = |p: &mut Vec<Value>| -> String {
            match p.remove(0) {
                Value::String(s) => s,
                other => other.db_string(),
            }
        };
        match kind {
            Kind::GetAll => Ok(Value::Array(
                self.db
                    .read()
                    .refs(c)
                    .map(|r| Value::String(r.clone()))
                    .collect(),
            )),
            Kind::GetAllRecords => Ok(self.all_records(c)),
            Kind::GetAllRecordsWhere | Kind::GetAllWhere => {
                let expr = take_str(&mut p);
                let filter = crate::dispatch::filter::parse(&expr)
                    .map_err(|e| ApiError::invalid_value(&expr, &e))?;
                let st = self.db.read();
                let mut out = Vec::new();
                for r in st.refs(c) {
                    let Some(row) = st.record(c, r) else { continue };
                    if filter.eval(&row) {
                        out.push((r.clone(), row));
                    }
                }
                Ok(if matches!(kind, Kind::GetAllWhere) {
                    Value::Array(out.into_iter().map(|(r, _)| Value::String(r)).collect())
                } else {
                    Value::Struct(out)
                })
            }
            Kind::GetRecord => {
                let r = take_str(&mut p);
                self.db
                    .read()
                    .record(c, &r)
                    .ok_or_else(|| ApiError::handle_invalid(c.name(), &r))
            }
            Kind::GetByUuid => {
                let u = take_str(&mut p);
                self.db
                    .read()
                    .by_uuid(c, &u)
                    .map(|r| Value::String(r.clone()))
                    .ok_or_else(|| ApiError::uuid_invalid(c.name(), &u))
            }
            Kind::GetByNameLabel => {
                let l = take_str(&mut p);
                let f = c
                    .field("name_label")
                    .ok_or_else(|| ApiError::internal("no name_label"))?;
                let st = self.db.read();
                Ok(Value::Array(
                    st.refs(c)
                        .filter(|r| {
                            st.get(f, r).as_ref().and_then(Value::as_str) == Some(l.as_str())
                        })
                        .map(|r| Value::String(r.clone()))
                        .collect(),
                ))
            }
            Kind::Create => {
                let args = p.remove(0);
                let reference = new_ref();
                let given = create_fields(c, &args)?;
                self.db
                    .write(|t| {
                        check_refs(t, c, &given)?;
                        t.create(c, &reference, given)?;
                        follow_up(t, c, &reference)
                    })
                    .map_err(db_err)?;
                Ok(Value::String(reference))
            }
            Kind::Destroy => {
                let r = take_str(&mut p);
                self.db.write(|t| t.delete(c, &r)).map_err(db_err)?;
                Ok(Value::String(String::new()))
            }
            Kind::Get(f) => {
                let r = take_str(&mut p);
                self.db
                    .read()
                    .get(*f, &r)
                    .ok_or_else(|| ApiError::handle_invalid(c.name(), &r))
            }
            Kind::Set(f) => {
                let r = take_str(&mut p);
                let v = check_field(*f, p.remove(0))?;
                self.db
                    .write(|t| {
                        check_refs(t, c, &[(f.index, v.clone())])?;
                        t.set(*f, &r, v)?;
                        follow_up(t, c, &r)
                    })
                    .map_err(db_err)?;
                Ok(Value::String(String::new()))
            }
            Kind::MapAdd(f) => {
                let r = take_str(&mut p);
                let key = p.remove(0).db_string();
                let val = p.remove(0);
                self.db
                    .write(|t| {
                        let cur = t
                            .state()
                            .get(*f, &r)
                            .ok_or_else(|| ApiError::handle_invalid(c.name(), &r))?;
                        let mut m = cur.as_struct().map(<[_]>::to_vec).unwrap_or_default();
                        if m.iter().any(|(k, _)| *k == key) {
                            let uuid = t.state().get_str(uuid_field(c), &r).unwrap_or_default();
                            return Err(errors::map_duplicate_key(
                                c.name(),
                                f.def().name,
                                &uuid,
                                &key,
                            ));
                        }
                        m.push((key.clone(), val.clone()));
                        t.set(*f, &r, Value::Struct(m))?;
                        follow_up(t, c, &r)
                    })
                    .map_err(db_err)?;
                Ok(Value::String(String::new()))
            }
            Kind::MapRemove(f) => {
                let r = take_str(&mut p);
                let key = p.remove(0).db_string();
                self.db
                    .write(|t| {
                        let cur = t
                            .state()
                            .get(*f, &r)
                            .ok_or_else(|| ApiError::handle_invalid(c.name(), &r))?;
                        let m = cur.as_struct().map(<[_]>::to_vec).unwrap_or_default();
                        if !m.iter().any(|(k, _)| *k == key) {
                            return Ok(());
                        }
                        t.set(
                            *f,
                            &r,
                            Value::Struct(m.into_iter().filter(|(k, _)| *k != key).collect()),
                        )?;
                        follow_up(t, c, &r)
                    })
                    .map_err(db_err)?;
                Ok(Value::String(String::new()))
            }
            Kind::SetAdd(f) | Kind::SetRemove(f) => {
                let adding = matches!(kind, Kind::SetAdd(_));
                let r = take_str(&mut p);
                let v = p.remove(0);
                self.db
                    .write(|t| {
                        let cur = t
                            .state()
                            .get(*f, &r)
                            .ok_or_else(|| ApiError::handle_invalid(c.name(), &r))?;
                        let mut s = cur.as_array().map(<[_]>::to_vec).unwrap_or_default();
                        let present = s.contains(&v);
                        if adding == present {
                            return Ok(());
                        }
                        if adding {
                            s.push(v.clone());
                        } else {
                            s.retain(|x| *x != v);
                        }
                        t.set(*f, &r, Value::Array(s))
                    })
                    .map_err(db_err)?;
                Ok(Value::String(String::new()))
            }
            Kind::Custom(_) => Err(ApiError::internal("unreachable dispatch")),
        }
    }

    /// Every record of a class as one struct keyed by ref.
    pub(crate) fn all_records(&self, c: ClassId) -> Value {
        let st = self.db.read();
        Value::Struct(
            st.refs(c)
                .filter_map(|r| Some((r.clone(), st.record(c, r)?)))
                .collect(),
        )
    }
}

/// Derived fields that a generic setter's change affects (a VM's
/// `allowed_operations` after `is_a_template` or `blocked_operations`).
/// Every VM gets `other_config:mac_seed` at creation, which its VIFs'
/// MACs come from (as in XAPI).
fn give_mac_seed(t: &mut Txn<'_>, vm: &str) -> Result<(), ApiError> {
    let mut oc = match t.state().get(field::vm::OTHER_CONFIG, vm) {
        Some(Value::Struct(m)) => m,
        _ => Vec::new(),
    };
    if oc.iter().any(|(k, _)| k == "mac_seed") {
        return Ok(());
    }
    oc.push(("mac_seed".into(), Value::String(corral_model::new_uuid())));
    t.set(field::vm::OTHER_CONFIG, vm, Value::Struct(oc))
}

pub(crate) fn follow_up(t: &mut Txn<'_>, c: ClassId, r: &str) -> Result<(), ApiError> {
    if c == class::VM {
        crate::ops::vm::lifecycle::refresh_allowed(t, r)?;
        give_mac_seed(t, r)?;
    }
    Ok(())
}
