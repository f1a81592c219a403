//! VM.destroy, clone, copy and provision.

use crate::context::Server;
use crate::core::call::{ApiResult, Ctx, void};
use crate::core::records::{db, to_value};
use crate::ops::query::{flag, strmap, vbds_of};
use crate::ops::vm::lifecycle::{BEING_MADE, mark_vm};
use crate::ops::vm::state::{drop_suspend_image, remove_consoles};
use corral_model::enums::{VmOperations, VmPowerState};
use corral_model::schema::{class, field};
use corral_model::{ApiError, NULL_REF, Value, errors, new_ref};
use std::sync::Arc;

/// The VDIs of `vm`'s disk VBDs that no other VM uses: what goes with the
/// VM when it is uninstalled (ISOs and shared disks stay).
pub(crate) fn own_disks(st: &corral_db::State, vm: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for vbd in vbds_of(st, vm) {
        if st.get_str(field::vbd::TYPE_, &vbd).as_deref() != Some("Disk") {
            continue;
        }
        let Some(vdi) = st.get_str(field::vbd::VDI, &vbd) else {
            continue;
        };
        if !st.exists(class::VDI, &vdi) || out.contains(&vdi) {
            continue;
        }
        let shared = st.refs(class::VBD).any(|b| {
            st.get_str(field::vbd::VDI, b).as_deref() == Some(vdi.as_str())
                && st.get_str(field::vbd::VM, b).as_deref() != Some(vm)
        });
        if !shared {
            out.push(vdi);
        }
    }
    out
}

pub(crate) async fn vm_destroy(s: Arc<Server>, c: Ctx, p: Vec<Value>) -> ApiResult {
    let vm = crate::core::records::first(p);
    let op = mark_vm(&s, &c, &vm, VmOperations::Destroy)?;
    if flag(&s.db.read(), field::vm::IS_DEFAULT_TEMPLATE, &vm) {
        return Err(errors::vm_cannot_delete_default_template(vm.as_str()));
    }
    drop_suspend_image(&s, &vm).await;
    drop(op);
    // Only what belongs to the VM goes: its VBDs, VIFs, consoles and
    // metrics records. Its disks (VDIs) stay, as in XAPI.
    db(s.db.write(|t| {
        for vbd in vbds_of(t.state(), &vm) {
            t.delete(class::VBD, &vbd)?;
        }
        for vif in crate::ops::vif::vifs_of(t.state(), &vm) {
            crate::ops::vif::delete_vif(t, &vif)?;
        }
        remove_consoles(t, &vm)?;
        for f in [field::vm::METRICS, field::vm::GUEST_METRICS] {
            let r = t.state().get_str(f, &vm).unwrap_or_default();
            let c = if f == field::vm::METRICS {
                class::VM_METRICS
            } else {
                class::VM_GUEST_METRICS
            };
            if t.state().exists(c, &r) {
                t.delete(c, &r)?;
            }
        }
        t.delete(class::VM, &vm)
    }))?;
    void()
}

/// VM.clone (`sr` None: disks cloned on their SRs) and VM.copy (full copies
/// onto `sr`, or onto each disk's own SR when `sr` is NULL).
pub(crate) async fn vm_clone_or_copy(
    s: Arc<Server>,
    c: Ctx,
    vm: &str,
    name: &str,
    sr: Option<&str>,
) -> ApiResult {
    let copy = sr.is_some();
    let (vm, name, sr) = (vm.to_owned(), name.to_owned(), sr.map(str::to_owned));
    let _op = mark_vm(
        &s,
        &c,
        &vm,
        if copy {
            VmOperations::Copy
        } else {
            VmOperations::Clone
        },
    )?;
    if let Some(sr) = sr.as_deref().filter(|r| *r != NULL_REF) {
        if !s.db.read().exists(class::SR, sr) {
            return Err(ApiError::handle_invalid("SR", sr));
        }
    }
    let vbds = vbds_of(&s.db.read(), &vm);
    let being_made = (!vbds.is_empty()).then_some(if copy { "copy" } else { "clone" });
    let new_vm = vm_clone_record(&s, &vm, &name, being_made)?;
    let mut made_vdis = Vec::new();
    let result = async {
        for vbd in &vbds {
            let vbd = vbd.as_str();
            let (vdi, ty, empty) = {
                let st = s.db.read();
                (
                    st.get_str(field::vbd::VDI, &vbd).unwrap_or_default(),
                    st.get_str(field::vbd::TYPE_, &vbd).unwrap_or_default(),
                    flag(&st, field::vbd::EMPTY, &vbd),
                )
            };
            let new_vdi = if ty == "CD" || empty || !s.db.read().exists(class::VDI, &vdi) {
                vdi.clone()
            } else if copy {
                let target = sr
                    .clone()
                    .filter(|r| r != NULL_REF)
                    .or_else(|| s.db.read().get_str(field::vdi::SR, &vdi))
                    .unwrap_or_default();
                let r = crate::ops::vdi::copy::vdi_copy_to(&s, &c, &vdi, &target).await?;
                made_vdis.push(r.clone());
                r
            } else {
                let r = crate::ops::vdi::copy::vdi_clone_of(&s, &vdi).await?;
                made_vdis.push(r.clone());
                r
            };
            copy_vbd(&s, &vbd, &new_vm, &new_vdi)?;
        }
        Ok::<(), ApiError>(())
    }
    .await;
    if let Err(e) = result {
        // Undo: the new VM and the disks made for it.
        let _ = db(s.db.write(|t| {
            for vbd in vbds_of(t.state(), &new_vm) {
                t.delete(class::VBD, &vbd)?;
            }
            t.delete(class::VM, &new_vm)
        }));
        for v in made_vdis {
            let _ = crate::ops::vdi::vdi_destroy(Arc::clone(&s), &v).await;
        }
        return Err(e);
    }
    if !vbds.is_empty() {
        set_other_config_key(&s, &new_vm, BEING_MADE, None)?;
    }
    Ok(Value::String(new_vm))
}

pub(crate) fn set_other_config_key(
    s: &Server,
    vm: &str,
    key: &str,
    value: Option<&str>,
) -> Result<(), ApiError> {
    db(s.db.write(|t| {
        let mut oc = strmap(t.state().get(field::vm::OTHER_CONFIG, vm));
        match value {
            Some(v) => oc.insert(key.into(), v.into()),
            None => oc.remove(key),
        };
        t.set(field::vm::OTHER_CONFIG, vm, to_value(&oc))
    }))
}

pub(crate) fn copy_vbd(s: &Server, vbd: &str, vm: &str, vdi: &str) -> Result<(), ApiError> {
    db(s.db.write(|t| {
        let st = t.state();
        let g = |f| st.get(f, vbd).unwrap_or(Value::Nil);
        let fields = vec![
            (field::vbd::VM.index, Value::str(vm)),
            (field::vbd::VDI.index, Value::str(vdi)),
            (field::vbd::USERDEVICE.index, g(field::vbd::USERDEVICE)),
            (field::vbd::BOOTABLE.index, g(field::vbd::BOOTABLE)),
            (field::vbd::MODE.index, g(field::vbd::MODE)),
            (field::vbd::TYPE_.index, g(field::vbd::TYPE_)),
            (field::vbd::UNPLUGGABLE.index, g(field::vbd::UNPLUGGABLE)),
            (field::vbd::EMPTY.index, g(field::vbd::EMPTY)),
            (field::vbd::OTHER_CONFIG.index, g(field::vbd::OTHER_CONFIG)),
            (
                field::vbd::QOS_ALGORITHM_TYPE.index,
                g(field::vbd::QOS_ALGORITHM_TYPE),
            ),
            (
                field::vbd::QOS_ALGORITHM_PARAMS.index,
                g(field::vbd::QOS_ALGORITHM_PARAMS),
            ),
        ];
        t.create(
            class::VBD,
            &new_ref(),
            fields
                .into_iter()
                .filter(|(_, v)| *v != Value::Nil)
                .collect(),
        )
    }))
}

/// A new empty VDI through `VDI.create` (its checks, journal and undo).
pub(crate) async fn new_vdi(
    s: &Arc<Server>,
    sr: &str,
    name: &str,
    size: i64,
    ty: &str,
    other_config: &[(&str, &str)],
) -> Result<String, ApiError> {
    let rec = Value::Struct(vec![
        ("name_label".into(), Value::str(name)),
        ("SR".into(), Value::str(sr)),
        ("virtual_size".into(), Value::Int(size)),
        ("type".into(), Value::str(ty)),
        ("sharable".into(), Value::Bool(false)),
        ("read_only".into(), Value::Bool(false)),
        (
            "other_config".into(),
            Value::Struct(
                other_config
                    .iter()
                    .map(|(k, v)| ((*k).into(), Value::str(*v)))
                    .collect(),
            ),
        ),
    ]);
    Ok(crate::ops::vdi::vdi_create(Arc::clone(s), vec![rec])
        .await?
        .db_string())
}

/// VM.provision: makes the disks a template's `other_config:disks` asks for
/// (XenServer's `<provision><disk device= size= sr= bootable= type=/>`).
pub(crate) async fn vm_provision(s: Arc<Server>, c: Ctx, vm: &str) -> ApiResult {
    let vm = vm.to_owned();
    let _op = mark_vm(&s, &c, &vm, VmOperations::Provision)?;
    // As XAPI: a provisioned VM is no template, disks or not (Ansible's
    // xenserver_guest provisions a template's clone and then starts it).
    db(s.db.write(|t| {
        t.set(field::vm::IS_A_TEMPLATE, &vm, Value::Bool(false))?;
        crate::ops::vm::lifecycle::refresh_allowed(t, &vm)
    }))?;
    let oc = strmap(s.db.read().get(field::vm::OTHER_CONFIG, &vm));
    let Some(xml) = oc.get("disks").cloned() else {
        return void();
    };
    let disks = parse_provision(&xml)?;
    let default_sr =
        s.db.read()
            .get_str(field::pool::DEFAULT_SR, &s.pool_ref)
            .unwrap_or_default();
    // Disks made so far, undone if a later one fails.
    let mut made: Vec<(String, Option<String>)> = Vec::new();
    let result = async {
        for d in disks {
            let sr = {
                let st = s.db.read();
                if d.sr.is_empty() {
                    default_sr.clone()
                } else {
                    st.by_uuid(class::SR, &d.sr)
                        .cloned()
                        .unwrap_or_else(|| d.sr.clone())
                }
            };
            if !s.db.read().exists(class::SR, &sr) {
                return Err(errors::vm_requires_sr(vm.as_str(), sr.as_str()));
            }
            let vdi = new_vdi(
                &s,
                &sr,
                &format!("{} {}", d.ty, d.device),
                d.size,
                &d.ty,
                &[],
            )
            .await?;
            made.push((vdi.clone(), None));
            let vbd = new_ref();
            db(s.db.write(|t| {
                t.create(
                    class::VBD,
                    &vbd,
                    vec![
                        (field::vbd::VM.index, Value::str(&vm)),
                        (field::vbd::VDI.index, Value::str(&vdi)),
                        (
                            field::vbd::USERDEVICE.index,
                            Value::String(d.device.clone()),
                        ),
                        (field::vbd::BOOTABLE.index, Value::Bool(d.bootable)),
                        (field::vbd::MODE.index, Value::str("RW")),
                        (field::vbd::TYPE_.index, Value::str("Disk")),
                        (field::vbd::EMPTY.index, Value::Bool(false)),
                    ],
                )
            }))?;
            if let Some(last) = made.last_mut() {
                last.1 = Some(vbd);
            }
        }
        Ok::<(), ApiError>(())
    }
    .await;
    if let Err(e) = result {
        for (vdi, vbd) in made.into_iter().rev() {
            if let Some(vbd) = vbd {
                let _ = db(s.db.write(|t| t.delete(class::VBD, &vbd)));
            }
            let _ = crate::ops::vdi::vdi_destroy(Arc::clone(&s), &vdi).await;
        }
        return Err(e);
    }
    set_other_config_key(&s, &vm, "disks", None)?;
    void()
}

pub(crate) struct ProvisionDisk {
    device: String,
    size: i64,
    sr: String,
    bootable: bool,
    ty: String,
}

pub(crate) fn parse_provision(xml: &str) -> Result<Vec<ProvisionDisk>, ApiError> {
    let bad = || ApiError::invalid_value("other_config:disks", xml);
    let mut out = Vec::new();
    for part in xml.split("<disk").skip(1) {
        let attrs = part.split("/>").next().ok_or_else(bad)?;
        let get = |k: &str| -> Option<String> {
            let i = attrs.find(&format!("{k}=\""))? + k.len() + 2;
            let rest = &attrs[i..];
            Some(rest[..rest.find('"')?].to_owned())
        };
        out.push(ProvisionDisk {
            device: get("device").ok_or_else(bad)?,
            size: get("size").and_then(|v| v.parse().ok()).ok_or_else(bad)?,
            sr: get("sr").unwrap_or_default(),
            bootable: get("bootable").as_deref() == Some("true"),
            ty: get("type").unwrap_or_else(|| "system".into()),
        });
    }
    Ok(out)
}

/// The record part of `VM.clone`/`VM.copy`: a new Halted VM copied from
/// `src` (its disks are the caller's business).
/// The new VM's record, a copy of `src`'s; `being_made` (clone or copy
/// with disks still to make) marks it in the same commit, so a crash can
/// never leave it unmarked.
pub fn vm_clone_record(
    s: &Server,
    src: &str,
    name: &str,
    being_made: Option<&str>,
) -> Result<String, ApiError> {
    let (src, name) = (src.to_owned(), name.to_owned());
    let r = new_ref();
    s.db.write(|t| {
        let st = t.state();
        let row = st
            .row(class::VM, &src)
            .ok_or_else(|| ApiError::handle_invalid("VM", &src))?;
        let power = crate::ops::query::power(st, &src);
        if power != VmPowerState::Halted {
            return Err(errors::vm_bad_power_state(
                src.as_str(),
                "halted",
                power.as_str().to_lowercase().as_str(),
            ));
        }
        let mut fields: Vec<(usize, Value)> = row.fields.iter().cloned().enumerate().collect();
        let set = |fields: &mut Vec<(usize, Value)>, f: corral_model::FieldId, v: Value| {
            fields[f.index].1 = v
        };
        set(&mut fields, field::vm::UUID, Value::str(""));
        set(
            &mut fields,
            field::vm::NAME_LABEL,
            Value::String(name.clone()),
        );
        set(
            &mut fields,
            field::vm::IS_DEFAULT_TEMPLATE,
            Value::Bool(false),
        );
        set(
            &mut fields,
            field::vm::ALLOWED_OPERATIONS,
            Value::Array(vec![]),
        );
        set(
            &mut fields,
            field::vm::CURRENT_OPERATIONS,
            Value::Struct(vec![]),
        );
        set(
            &mut fields,
            field::vm::RESIDENT_ON,
            Value::str(corral_model::NULL_REF),
        );
        set(
            &mut fields,
            field::vm::SNAPSHOT_OF,
            Value::str(corral_model::NULL_REF),
        );
        set(&mut fields, field::vm::PARENT, Value::str(&src));
        // A VM of its own gets MACs of its own.
        let seed = corral_model::new_uuid();
        if let Value::Struct(oc) = &mut fields[field::vm::OTHER_CONFIG.index].1 {
            oc.retain(|(k, _)| k != "default_template" && k != "mac_seed" && k != BEING_MADE);
            oc.push(("mac_seed".into(), Value::String(seed.clone())));
            if let Some(what) = being_made {
                oc.push((BEING_MADE.into(), Value::str(what)));
            }
        }
        set(
            &mut fields,
            field::vm::METRICS,
            Value::str(corral_model::NULL_REF),
        );
        set(
            &mut fields,
            field::vm::GUEST_METRICS,
            Value::str(corral_model::NULL_REF),
        );
        set(
            &mut fields,
            field::vm::POWER_STATE,
            Value::str(VmPowerState::Halted.as_str()),
        );
        set(&mut fields, field::vm::DOMID, Value::Int(-1));
        set(
            &mut fields,
            field::vm::SUSPEND_VDI,
            Value::str(corral_model::NULL_REF),
        );
        fields.retain(|(i, _)| class::VM.def().fields[*i].rel.is_none());
        t.create(class::VM, &r, fields)?;
        crate::ops::vif::copy_vifs(t, &src, &r, &seed)?;
        crate::ops::vm::lifecycle::refresh_allowed(t, &r)
    })
    .map_err(ApiError::from)?;
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// XenServer's `<provision>` XML: every disk with its attributes, the
    /// defaults for the optional ones, and a clear error for a broken one.
    #[test]
    fn provision_xml() {
        let disks = parse_provision(
            r#"<provision><disk device="0" size="34359738368" sr="" bootable="true" type="system"/><disk device="1" size="1024" sr="u-1"/></provision>"#,
        )
        .expect("parses");
        assert_eq!(disks.len(), 2);
        assert_eq!(
            (
                disks[0].device.as_str(),
                disks[0].size,
                disks[0].sr.as_str(),
                disks[0].bootable,
                disks[0].ty.as_str()
            ),
            ("0", 34359738368, "", true, "system")
        );
        assert_eq!(
            (
                disks[1].device.as_str(),
                disks[1].size,
                disks[1].sr.as_str(),
                disks[1].bootable,
                disks[1].ty.as_str()
            ),
            ("1", 1024, "u-1", false, "system")
        );
        assert!(
            parse_provision("<provision></provision>")
                .expect("empty")
                .is_empty()
        );
        let err = parse_provision(r#"<provision><disk device="0" size="big"/></provision>"#)
            .err()
            .expect("a size must be a number");
        assert_eq!(err.description()[0], "INVALID_VALUE");
    }
}
