//! SR and VDI records: fields, sizes, secrets, allowed operations and their marks.

use crate::context::Server;
use crate::core::marks::{Mark, Want};
use crate::core::records::{db, strmap};
use crate::ops::storage::backend::{SrOn, blocking};
use corral_db::Txn;
use corral_model::errors;
use corral_model::schema::{class, field};
use corral_model::{ApiError, NULL_REF, Value, new_ref};
use corral_storage::{FORMAT_VERSION, VdiInfo};
use std::collections::{BTreeMap, HashMap};

/// device-config keys whose values are stored as `secret` objects.
pub(crate) const SECRET_KEYS: &[&str] = &[
    "password",
    "chappassword",
    "incoming_chappassword",
    "cifspassword",
];

pub(crate) const SR_OPS: &[(&str, Option<&str>)] = &[
    ("scan", Some("SR_SCAN")),
    ("destroy", None),
    ("forget", None),
    ("plug", None),
    ("unplug", None),
    ("update", None),
    ("vdi_create", Some("VDI_CREATE")),
    ("vdi_introduce", Some("VDI_INTRODUCE")),
    ("vdi_destroy", Some("VDI_DELETE")),
    ("vdi_resize", Some("VDI_RESIZE")),
    ("vdi_clone", Some("VDI_CLONE")),
    ("vdi_snapshot", Some("VDI_SNAPSHOT")),
    ("vdi_copy", None),
    ("pbd_create", None),
    ("pbd_destroy", None),
];

/// Recomputes SR.allowed_operations and those of its VDIs from the driver's
/// capabilities, the SR's format and the current operations.
pub(crate) fn refresh_allowed(t: &mut Txn<'_>, sr: &str) -> Result<(), ApiError> {
    let st = t.state();
    let Some(kind) = st.get_str(field::sr::TYPE_, sr) else {
        return Ok(());
    };
    let caps: &[&str] = corral_storage::driver(&kind)
        .map(|d| d.info().capabilities)
        .unwrap_or(&[]);
    let legacy = strmap(&st.get(field::sr::SM_CONFIG, sr).unwrap_or(Value::Nil))
        .get("format_version")
        .is_some_and(|v| v.parse::<u32>().unwrap_or(FORMAT_VERSION) < FORMAT_VERSION);
    let busy = !st
        .get(field::sr::CURRENT_OPERATIONS, sr)
        .and_then(|v| v.as_struct().map(|m| m.is_empty()))
        .unwrap_or(true);
    let sr_allowed: Vec<&str> = if busy {
        vec![]
    } else {
        SR_OPS
            .iter()
            .filter(|(_, cap)| cap.is_none_or(|c| caps.contains(&c)))
            .filter(|(op, _)| !(legacy && matches!(*op, "vdi_clone" | "vdi_snapshot")))
            .map(|(op, _)| *op)
            .collect()
    };
    let vdis: Vec<String> = st
        .refs(class::VDI)
        .filter(|v| st.get_str(field::vdi::SR, v).as_deref() == Some(sr))
        .cloned()
        .collect();
    let mut vdi_allowed = Vec::new();
    for v in &vdis {
        let managed = st
            .get(field::vdi::MANAGED, v)
            .and_then(|x| x.as_bool())
            .unwrap_or(true);
        let vbusy = !st
            .get(field::vdi::CURRENT_OPERATIONS, v)
            .and_then(|x| x.as_struct().map(|m| m.is_empty()))
            .unwrap_or(true);
        let ops: Vec<&str> = if !managed || vbusy {
            vec![]
        } else {
            [
                ("clone", Some("VDI_CLONE")),
                ("copy", None),
                ("resize", Some("VDI_RESIZE")),
                ("snapshot", Some("VDI_SNAPSHOT")),
                ("destroy", Some("VDI_DELETE")),
                ("forget", None),
                ("update", Some("VDI_UPDATE")),
            ]
            .iter()
            .filter(|(_, cap)| cap.is_none_or(|c| caps.contains(&c)))
            .filter(|(op, _)| !(legacy && matches!(*op, "clone" | "snapshot")))
            .map(|(op, _)| *op)
            .collect()
        };
        vdi_allowed.push((v.clone(), ops));
    }
    t.set(
        field::sr::ALLOWED_OPERATIONS,
        sr,
        Value::string_set(sr_allowed),
    )?;
    for (v, ops) in vdi_allowed {
        t.set(field::vdi::ALLOWED_OPERATIONS, &v, Value::string_set(ops))?;
    }
    Ok(())
}

/// Marks `sr_op` on the SR (and `vdi_op` on a VDI of it) for the mark's
/// lifetime.
pub(crate) fn mark_storage(
    s: &Server,
    sr: &str,
    vdi: Option<&str>,
    sr_op: &str,
    vdi_op: &str,
) -> Result<Mark, ApiError> {
    let mut wants = vec![Want {
        current: field::sr::CURRENT_OPERATIONS,
        obj: sr,
        op: sr_op,
        check: None,
        refresh: refresh_allowed,
    }];
    if let Some(v) = vdi {
        wants.push(Want {
            current: field::vdi::CURRENT_OPERATIONS,
            obj: v,
            op: vdi_op,
            check: None,
            refresh: refresh_vdi_allowed,
        });
    }
    Mark::take(&s.db, new_ref(), &wants)
}

/// A VDI's allowed operations follow its SR's.
fn refresh_vdi_allowed(t: &mut Txn<'_>, vdi: &str) -> Result<(), ApiError> {
    match t.state().get_str(field::vdi::SR, vdi) {
        Some(sr) if t.state().exists(class::SR, &sr) => refresh_allowed(t, &sr),
        _ => Ok(()),
    }
}

pub(crate) fn vdi_busy(st: &corral_db::State, vdi: &str, op: &str) -> Result<(), ApiError> {
    let busy = st
        .get(field::vdi::CURRENT_OPERATIONS, vdi)
        .and_then(|v| v.as_struct().map(|m| !m.is_empty()))
        .unwrap_or(false);
    if busy {
        return Err(errors::vdi_in_use(vdi, op));
    }
    Ok(())
}

pub(crate) fn vdi_fields(
    sr: &str,
    info: &VdiInfo,
    name: &str,
    descr: &str,
    ty: &str,
) -> Vec<(usize, Value)> {
    vec![
        (field::vdi::NAME_LABEL.index, Value::str(name)),
        (field::vdi::NAME_DESCRIPTION.index, Value::str(descr)),
        (field::vdi::SR.index, Value::str(sr)),
        (
            field::vdi::VIRTUAL_SIZE.index,
            Value::Int(info.virtual_size),
        ),
        (
            field::vdi::PHYSICAL_UTILISATION.index,
            Value::Int(info.physical_utilisation),
        ),
        (field::vdi::TYPE_.index, Value::str(ty)),
        (field::vdi::SHARABLE.index, Value::Bool(false)),
        (field::vdi::READ_ONLY.index, Value::Bool(info.read_only)),
        (field::vdi::OTHER_CONFIG.index, Value::Struct(vec![])),
        (field::vdi::LOCATION.index, Value::str(&info.location)),
        (field::vdi::MANAGED.index, Value::Bool(true)),
        (field::vdi::MISSING.index, Value::Bool(false)),
        (field::vdi::PARENT.index, Value::str(NULL_REF)),
        (field::vdi::SM_CONFIG.index, sm_config_for(None)),
    ]
}

pub(crate) fn sm_config_for(parent_uuid: Option<&str>) -> Value {
    let mut m = vec![];
    if let Some(p) = parent_uuid {
        // XenCenter draws snapshot trees from this key.
        m.push(("vhd-parent".to_owned(), Value::str(p)));
    }
    Value::Struct(m)
}

pub(crate) fn vdis_of(st: &corral_db::State, sr: &str) -> Vec<String> {
    st.refs(class::VDI)
        .filter(|v| st.get_str(field::vdi::SR, v).as_deref() == Some(sr))
        .cloned()
        .collect()
}

pub(crate) fn vdi_attached(st: &corral_db::State, vdi: &str) -> bool {
    st.refs(class::VBD).any(|b| {
        st.get_str(field::vbd::VDI, b).as_deref() == Some(vdi)
            && st
                .get(field::vbd::CURRENTLY_ATTACHED, b)
                .and_then(|v| v.as_bool())
                .unwrap_or(false)
    })
}

/// Sets SR sizes from the driver's stat and the VDIs' sizes.
pub(crate) fn write_sr_sizes(
    t: &mut Txn<'_>,
    sr: &str,
    stat: corral_storage::SrStat,
) -> Result<(), ApiError> {
    let st = t.state();
    let virtual_allocation: i64 = vdis_of(st, sr)
        .iter()
        .filter(|v| {
            st.get(field::vdi::MANAGED, v)
                .and_then(|x| x.as_bool())
                .unwrap_or(true)
        })
        .filter_map(|v| st.get(field::vdi::VIRTUAL_SIZE, v).and_then(|x| x.as_int()))
        .sum();
    t.set(field::sr::PHYSICAL_SIZE, sr, Value::Int(stat.physical_size))?;
    t.set(
        field::sr::PHYSICAL_UTILISATION,
        sr,
        Value::Int(stat.physical_utilisation),
    )?;
    t.set(
        field::sr::VIRTUAL_ALLOCATION,
        sr,
        Value::Int(virtual_allocation),
    )
}

pub(crate) async fn refresh_sizes(s: &Server, on: &SrOn) {
    let (d, ctx) = (on.driver, on.ctx.clone());
    if let Ok(Ok(stat)) = blocking(move || d.stat(&ctx)).await {
        let _ = s.db.write(|t| write_sr_sizes(t, &on.sr, stat));
    }
}

/// Replaces secret device-config values with `secret` objects.
pub(crate) fn store_secrets(
    t: &mut Txn<'_>,
    dc: &mut BTreeMap<String, String>,
) -> Result<(), ApiError> {
    for k in SECRET_KEYS {
        if let Some(v) = dc.remove(*k) {
            let r = new_ref();
            let uuid = corral_model::new_uuid();
            t.create(
                class::SECRET,
                &r,
                vec![
                    (field::secret::UUID.index, Value::str(&uuid)),
                    (field::secret::VALUE.index, Value::String(v)),
                ],
            )?;
            dc.insert(format!("{k}_secret"), uuid);
        }
    }
    Ok(())
}

pub(crate) fn delete_secrets(
    t: &mut Txn<'_>,
    dc: &BTreeMap<String, String>,
) -> Result<(), ApiError> {
    for (k, v) in dc {
        if k.ends_with("_secret") {
            if let Some(r) = t.state().by_uuid(class::SECRET, v).cloned() {
                t.delete(class::SECRET, &r)?;
            }
        }
    }
    Ok(())
}

pub(crate) fn pbds_of(st: &corral_db::State, sr: &str) -> Vec<String> {
    st.refs(class::PBD)
        .filter(|p| st.get_str(field::pbd::SR, p).as_deref() == Some(sr))
        .cloned()
        .collect()
}

/// `HANDLE_INVALID` for a missing object, `OPERATION_NOT_ALLOWED` while its
/// `currently_attached` flag is set (PBDs and VBDs are destroyed unplugged).
pub(crate) fn assert_detached(
    st: &corral_db::State,
    attached: corral_model::FieldId,
    r: &str,
) -> Result<(), ApiError> {
    let c = attached.class;
    if !st.exists(c, r) {
        return Err(ApiError::handle_invalid(c.name(), r));
    }
    if st
        .get(attached, r)
        .and_then(|v| v.as_bool())
        .unwrap_or(false)
    {
        return Err(ApiError::operation_not_allowed(format!(
            "{} is currently attached",
            c.name()
        )));
    }
    Ok(())
}

/// A VDI's sizes as the storage reports them.
pub(crate) fn write_vdi_sizes(t: &mut Txn<'_>, vdi: &str, info: &VdiInfo) -> Result<(), ApiError> {
    t.set(field::vdi::VIRTUAL_SIZE, vdi, Value::Int(info.virtual_size))?;
    t.set(
        field::vdi::PHYSICAL_UTILISATION,
        vdi,
        Value::Int(info.physical_utilisation),
    )
}

/// SM records follow the drivers this build has (added, updated, removed).
pub fn sync_sm_records(s: &Server) -> Result<(), ApiError> {
    db(s.db.write(|t| {
        let st = t.state();
        let existing: HashMap<String, String> = st
            .refs(class::SM)
            .filter_map(|r| Some((st.get_str(field::sm::TYPE_, r)?, r.clone())))
            .collect();
        for (kind, r) in &existing {
            if corral_storage::driver(kind).is_none() {
                t.delete(class::SM, r)?;
            }
        }
        for kind in corral_storage::driver_kinds() {
            let Some(d) = corral_storage::driver(kind) else {
                continue;
            };
            let info = d.info();
            let fields = vec![
                (field::sm::NAME_LABEL.index, Value::str(info.name)),
                (
                    field::sm::NAME_DESCRIPTION.index,
                    Value::str(info.description),
                ),
                (field::sm::TYPE_.index, Value::str(info.kind)),
                (field::sm::VENDOR.index, Value::str("Corral")),
                (
                    field::sm::COPYRIGHT.index,
                    Value::str("(C) Corral developers"),
                ),
                (field::sm::VERSION.index, Value::str("1.0")),
                (field::sm::REQUIRED_API_VERSION.index, Value::str("1.0")),
                (
                    field::sm::CONFIGURATION.index,
                    Value::Struct(
                        info.configuration
                            .iter()
                            .map(|(k, h)| ((*k).to_owned(), Value::str(*h)))
                            .collect(),
                    ),
                ),
                (
                    field::sm::CAPABILITIES.index,
                    Value::string_set(info.capabilities.iter().copied()),
                ),
                (
                    field::sm::FEATURES.index,
                    Value::Struct(
                        info.capabilities
                            .iter()
                            .map(|c| ((*c).to_owned(), Value::Int(1)))
                            .collect(),
                    ),
                ),
                (
                    field::sm::DRIVER_FILENAME.index,
                    Value::str(format!("corral-storage/{}", info.kind)),
                ),
            ];
            match existing.get(*kind) {
                Some(r) => {
                    for (i, v) in fields {
                        t.set(
                            corral_model::FieldId {
                                class: class::SM,
                                index: i,
                            },
                            r,
                            v,
                        )?;
                    }
                }
                None => t.create(class::SM, &new_ref(), fields)?,
            }
        }
        Ok(())
    }))
}
