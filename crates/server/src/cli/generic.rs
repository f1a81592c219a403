//! <class>-list and <class>-param-* for every class.

use crate::cli::args::{Cmd, STD_PARAMS};
use crate::cli::context::{CliCtx, CliError, text};
use crate::cli::protocol::Out;
use crate::cli::records::CliClass;
use crate::cli::records::table;
use corral_model::Value;
use corral_model::schema::{Ty, class};

impl CliCtx {
    pub(crate) async fn generic(
        &self,
        cc: &CliClass,
        suffix: &str,
        cmd: &Cmd,
        out: &mut Vec<Out>,
    ) -> Result<(), CliError> {
        let cname = cc.class.name();
        match suffix {
            "-list" => {
                let params = cmd.get("params");
                let filters: Vec<(String, String)> = cmd
                    .params
                    .iter()
                    .filter(|(k, _)| {
                        !STD_PARAMS.contains(&k.as_str())
                            && k != "params"
                            && !k.starts_with("database:")
                    })
                    .cloned()
                    .collect();
                // Only the columns printed are rendered: each reference in
                // them costs a lookup.
                let wanted: Option<Vec<&str>> = match params {
                    Some("all") => None,
                    Some(p) => Some(p.split(',').map(str::trim).collect()),
                    None if cc.default_params.is_empty() => None,
                    None => Some(cc.default_params.to_vec()),
                };
                let mut printed = Vec::new();
                for (_, rec) in self.records(cc).await? {
                    if !self.matches(cc, &rec, &filters).await? {
                        continue;
                    }
                    let mut cols = self
                        .cli_record(cc, &rec, |n| wanted.as_ref().is_none_or(|w| w.contains(&n)))
                        .await?;
                    // A legacy-format SR says so in sr-list (Corral
                    // extension; the SR needs `xe sr-upgrade`).
                    if params.is_none()
                        && cc.class == class::SR
                        && rec
                            .member("sm_config")
                            .and_then(|m| m.member("requires_upgrade"))
                            .and_then(Value::as_str)
                            == Some("true")
                    {
                        cols.push(("requires-upgrade".into(), " RO", "true".into()));
                    }
                    printed.push(cols);
                }
                if cmd.flag("minimal") {
                    let firsts: Vec<String> = printed
                        .iter()
                        .filter_map(|c| {
                            c.first()
                                .map(|(_, _, v)| v.replace('\\', "\\\\").replace(',', "\\,"))
                        })
                        .collect();
                    out.push(Out::Print(firsts.join(",")));
                } else {
                    for cols in printed {
                        out.push(Out::Print(format!("{}\n", table(&cols))));
                    }
                }
                Ok(())
            }
            "-param-list" => {
                let (_, rec) = self.by_uuid(cc, cmd).await?;
                let cols = self.cli_record(cc, &rec, |_| true).await?;
                out.push(Out::Print(format!("{}\n", table(&cols))));
                Ok(())
            }
            "-param-get" => {
                let (_, rec) = self.by_uuid(cc, cmd).await?;
                let Some(pn) = cmd.get("param-name") else {
                    return text("Required parameter not found: param-name");
                };
                let f = self.field_for(cc, pn)?;
                let v = rec.member(f.name).cloned().unwrap_or(Value::Nil);
                match cmd.get("param-key") {
                    Some(k) => match v.member(k) {
                        Some(x) => out.push(Out::Print(x.db_string())),
                        None => return text(format!("Key {k} not found in map")),
                    },
                    None => out.push(Out::Print(self.render(f, &v).await?)),
                }
                Ok(())
            }
            "-param-set" => {
                let (r, _) = self.by_uuid(cc, cmd).await?;
                for (k, v) in cmd
                    .params
                    .iter()
                    .filter(|(k, _)| k != "uuid" && !STD_PARAMS.contains(&k.as_str()))
                {
                    if let Some((m, key)) = k.split_once(':') {
                        let f = self.field_for(cc, m)?;
                        if !matches!(f.ty, Ty::Map(..)) || f.ops_role.is_none() {
                            return text(format!("Field '{m}' is read-only."));
                        }
                        self.call(
                            &format!("{cname}.remove_from_{}", f.name),
                            vec![Value::String(r.clone()), Value::str(key)],
                        )
                        .await?;
                        self.call(
                            &format!("{cname}.add_to_{}", f.name),
                            vec![Value::String(r.clone()), Value::str(key), Value::str(v)],
                        )
                        .await?;
                        continue;
                    }
                    let f = self.field_for(cc, k)?;
                    if matches!(f.ty, Ty::Set(_)) {
                        return text("Cannot param-set on set fields");
                    }
                    if f.set_role.is_none() || matches!(f.ty, Ty::Map(..)) {
                        return text(format!("Field '{k}' is read-only."));
                    }
                    let val = self.value_of(&f.ty, v, k).await?;
                    self.call(
                        &format!("{cname}.set_{}", f.name),
                        vec![Value::String(r.clone()), val],
                    )
                    .await?;
                }
                Ok(())
            }
            "-param-add" => {
                let (r, _) = self.by_uuid(cc, cmd).await?;
                let Some(pn) = cmd.get("param-name") else {
                    return text("Required parameter not found: param-name");
                };
                let f = self.field_for(cc, pn)?;
                if f.ops_role.is_none() {
                    return text("Parameter is read-only");
                }
                match f.ty {
                    Ty::Set(inner) => {
                        let Some(key) = cmd.get("param-key") else {
                            return text("Required parameter not found: param-key");
                        };
                        for item in key.split(',') {
                            let v = self.value_of(inner, item.trim(), pn).await?;
                            self.call(
                                &format!("{cname}.add_{}", f.name),
                                vec![Value::String(r.clone()), v],
                            )
                            .await?;
                        }
                    }
                    _ => {
                        for (k, v) in cmd.params.iter().filter(|(k, _)| {
                            !["uuid", "param-name"].contains(&k.as_str())
                                && !STD_PARAMS.contains(&k.as_str())
                        }) {
                            self.call(
                                &format!("{cname}.add_to_{}", f.name),
                                vec![Value::String(r.clone()), Value::str(k), Value::str(v)],
                            )
                            .await?;
                        }
                    }
                }
                Ok(())
            }
            "-param-remove" => {
                let (r, rec) = self.by_uuid(cc, cmd).await?;
                let Some(pn) = cmd.get("param-name") else {
                    return text("Required parameter not found: param-name");
                };
                let Some(key) = cmd.get("param-key") else {
                    return text("Required parameter not found: param-key");
                };
                let f = self.field_for(cc, pn)?;
                if f.ops_role.is_none() {
                    return text("Parameter is read-only");
                }
                let cur = rec.member(f.name).cloned().unwrap_or(Value::Nil);
                match f.ty {
                    Ty::Set(inner) => {
                        let v = self.value_of(inner, key, pn).await?;
                        if !cur.as_array().unwrap_or_default().contains(&v) {
                            return text(format!("Key {key} is not in the set"));
                        }
                        self.call(
                            &format!("{cname}.remove_{}", f.name),
                            vec![Value::String(r), v],
                        )
                        .await?;
                    }
                    _ => {
                        if cur.member(key).is_none() {
                            return text(format!("Key {key} is not in map"));
                        }
                        self.call(
                            &format!("{cname}.remove_from_{}", f.name),
                            vec![Value::String(r), Value::str(key)],
                        )
                        .await?;
                    }
                }
                Ok(())
            }
            "-param-clear" => {
                let (r, _) = self.by_uuid(cc, cmd).await?;
                let Some(pn) = cmd.get("param-name") else {
                    return text("Required parameter not found: param-name");
                };
                let f = self.field_for(cc, pn)?;
                if f.set_role.is_none() && f.ops_role.is_none() {
                    return text(format!("Field '{pn}' is read-only."));
                }
                let empty = match f.ty {
                    Ty::Set(_) => Value::Array(vec![]),
                    Ty::Map(..) => Value::Struct(vec![]),
                    _ => Value::str(""),
                };
                if f.set_role.is_some() {
                    self.call(
                        &format!("{cname}.set_{}", f.name),
                        vec![Value::String(r), empty],
                    )
                    .await?;
                } else if let Ty::Map(..) = f.ty {
                    let cur = self
                        .call(
                            &format!("{cname}.get_{}", f.name),
                            vec![Value::String(r.clone())],
                        )
                        .await?;
                    for (k, _) in cur.as_struct().map(<[_]>::to_vec).unwrap_or_default() {
                        self.call(
                            &format!("{cname}.remove_from_{}", f.name),
                            vec![Value::String(r.clone()), Value::String(k)],
                        )
                        .await?;
                    }
                }
                Ok(())
            }
            _ => text(format!("Unknown command: {}", cmd.name)),
        }
    }

    pub(crate) async fn by_uuid(
        &self,
        cc: &CliClass,
        cmd: &Cmd,
    ) -> Result<(String, Value), CliError> {
        let Some(uuid) = cmd.get("uuid") else {
            return text("Required parameter not found: uuid");
        };
        let r = self
            .call(
                &format!("{}.get_by_uuid", cc.class.name()),
                vec![Value::str(uuid)],
            )
            .await?;
        let r = r.as_str().unwrap_or_default().to_owned();
        let rec = self
            .call(
                &format!("{}.get_record", cc.class.name()),
                vec![Value::String(r.clone())],
            )
            .await?;
        Ok((r, rec))
    }
}
