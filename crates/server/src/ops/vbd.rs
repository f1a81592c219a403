//! VBD.create, destroy, plug, unplug, insert, eject and set_mode.

use crate::context::Server;
use crate::core::call::{ApiResult, pstr, void};
use crate::core::driver_errors;
use crate::core::records::{check_refs, create_fields, db, first, given_field};
use crate::ops::query::{device_name, flag, power, running_uuid, vdi_read_only};
use crate::ops::storage::records::assert_detached;
use crate::ops::vdi::vdi_image_of;
use corral_agent::Drive;
use corral_model::enums::VmPowerState;
use corral_model::errors;
use corral_model::schema::{class, field};
use corral_model::{ApiError, NULL_REF, Value, new_ref};
use std::collections::HashSet;
use std::sync::Arc;

/// The agent's view of one VBD, if it has a medium or is a CD drive.
pub(crate) fn drive_of(
    s: &Server,
    st: &corral_db::State,
    vbd: &str,
) -> Result<Option<Drive>, ApiError> {
    let ty = st.get_str(field::vbd::TYPE_, vbd).unwrap_or_default();
    let cdrom = ty == "CD";
    if ty == "Floppy" {
        return Ok(None);
    }
    let empty = flag(st, field::vbd::EMPTY, vbd);
    let vdi = st.get_str(field::vbd::VDI, vbd).unwrap_or_default();
    let id = st.get_str(field::vbd::UUID, vbd).unwrap_or_default();
    let read_only = st.get_str(field::vbd::MODE, vbd).as_deref() == Some("RO");
    if empty || !st.exists(class::VDI, &vdi) {
        if cdrom {
            return Ok(Some(Drive {
                id,
                path: None,
                format: "raw".into(),
                read_only: true,
                cdrom,
            }));
        }
        return Err(errors::vm_requires_vdi(vbd, vdi.as_str()));
    }
    let image = vdi_image_of(s, st, &vdi)?;
    Ok(Some(Drive {
        id,
        path: Some(image.path),
        format: image.format.qemu_name().to_owned(),
        // Decided here, where the drive is built, whatever path led to it
        // (VBD.create, VBD.set_mode, a CD insert).
        read_only: read_only || cdrom || vdi_read_only(st, &vdi),
        cdrom,
    }))
}

/// A VDI attached read-write by a running VM cannot be used by another.
pub(crate) fn check_vdi_free(st: &corral_db::State, vm: &str, vbd: &str) -> Result<(), ApiError> {
    let vdi = st.get_str(field::vbd::VDI, vbd).unwrap_or_default();
    if !st.exists(class::VDI, &vdi) || flag(st, field::vbd::EMPTY, vbd) {
        return Ok(());
    }
    let rw = st.get_str(field::vbd::MODE, vbd).as_deref() == Some("RW");
    for other in st.refs(class::VBD) {
        if other == vbd
            || st.get_str(field::vbd::VDI, other).as_deref() != Some(vdi.as_str())
            || !flag(st, field::vbd::CURRENTLY_ATTACHED, other)
        {
            continue;
        }
        let other_vm = st.get_str(field::vbd::VM, other).unwrap_or_default();
        if other_vm == vm {
            continue;
        }
        let other_rw = st.get_str(field::vbd::MODE, other).as_deref() == Some("RW");
        if rw || other_rw {
            return Err(errors::vdi_in_use(vdi.as_str(), "start"));
        }
    }
    Ok(())
}

pub(crate) async fn vbd_plug(s: Arc<Server>, vbd: &str) -> ApiResult {
    let vbd = vbd.to_owned();
    if !s.db.read().exists(class::VBD, &vbd) {
        return Err(ApiError::handle_invalid("VBD", &vbd));
    }
    let Some((vm, uuid, host)) = running_uuid(&s, &vbd) else {
        let vm =
            s.db.read()
                .get_str(field::vbd::VM, &vbd)
                .unwrap_or_default();
        let actual = power(&s.db.read(), &vm).as_str().to_lowercase();
        return Err(errors::vm_bad_power_state(
            vm.as_str(),
            "running",
            actual.as_str(),
        ));
    };
    let drive = {
        let st = s.db.read();
        if flag(&st, field::vbd::CURRENTLY_ATTACHED, &vbd) {
            return Err(errors::device_already_attached(vbd.as_str()));
        }
        check_vdi_free(&st, &vm, &vbd)?;
        drive_of(&s, &st, &vbd)?
    };
    let Some(drive) = drive else {
        return Err(ApiError::operation_not_allowed(
            "this VBD type cannot be plugged",
        ));
    };
    if drive.cdrom {
        // QEMU's emulated CD drives (IDE) cannot be hot-plugged.
        return Err(ApiError::operation_not_allowed(
            "CD drives cannot be plugged into a running VM; the VM gets this drive when it next starts",
        ));
    }
    s.host(&host)?
        .agent
        .drive_attach(&uuid, drive)
        .await
        .map_err(|e| driver_errors::agent(&vm, e))?;
    db(s.db.write(|t| {
        let ud = t
            .state()
            .get_str(field::vbd::USERDEVICE, &vbd)
            .unwrap_or_default();
        t.set(field::vbd::DEVICE, &vbd, Value::String(device_name(&ud)))?;
        t.set(field::vbd::CURRENTLY_ATTACHED, &vbd, Value::Bool(true))
    }))?;
    void()
}

pub(crate) async fn vbd_unplug(s: Arc<Server>, vbd: &str) -> ApiResult {
    let vbd = vbd.to_owned();
    let (attached, uuid, ty) = {
        let st = s.db.read();
        if !st.exists(class::VBD, &vbd) {
            return Err(ApiError::handle_invalid("VBD", &vbd));
        }
        (
            flag(&st, field::vbd::CURRENTLY_ATTACHED, &vbd),
            st.get_str(field::vbd::UUID, &vbd).unwrap_or_default(),
            st.get_str(field::vbd::TYPE_, &vbd).unwrap_or_default(),
        )
    };
    if !attached {
        return Err(errors::device_already_detached(vbd.as_str()));
    }
    if ty == "CD" {
        return Err(errors::vbd_not_unpluggable(vbd.as_str()));
    }
    let Some((_, vm_uuid, host)) = running_uuid(&s, &vbd) else {
        return Err(errors::device_already_detached(vbd.as_str()));
    };
    s.host(&host)?
        .agent
        .drive_detach(&vm_uuid, &uuid)
        .await
        .map_err(|e| errors::device_detach_rejected("VBD", vbd.as_str(), e.to_string().as_str()))?;
    db(s.db.write(|t| t.set(field::vbd::CURRENTLY_ATTACHED, &vbd, Value::Bool(false))))?;
    void()
}

/// VBD.insert / VBD.eject: the record first (it validates), then the
/// running VM's drive; a failed media change puts the record back.
/// `insert`: the VDI to insert; none to eject.
pub(crate) async fn vbd_media(s: Arc<Server>, vbd: &str, insert: Option<&str>) -> ApiResult {
    let vbd = vbd.to_owned();
    let before = s.db.read().get_str(field::vbd::VDI, &vbd);
    match insert {
        Some(vdi) => vbd_insert(&s, &vbd, vdi)?,
        None => vbd_eject(&s, &vbd)?,
    };
    let insert = insert.is_some();
    // A drive added while the VM ran is not in QEMU yet: its medium is
    // recorded for the next start.
    let plugged = flag(&s.db.read(), field::vbd::CURRENTLY_ATTACHED, &vbd);
    if let Some((vm, vm_uuid, host)) = running_uuid(&s, &vbd).filter(|_| plugged) {
        let (id, medium) = {
            let st = s.db.read();
            let id = st.get_str(field::vbd::UUID, &vbd).unwrap_or_default();
            let medium = if insert {
                let vdi = st.get_str(field::vbd::VDI, &vbd).unwrap_or_default();
                let image = vdi_image_of(&s, &st, &vdi)?;
                Some(corral_agent::Medium {
                    path: image.path,
                    format: image.format.qemu_name().to_owned(),
                })
            } else {
                None
            };
            (id, medium)
        };
        let changed = match s.host(&host) {
            Ok(h) => h
                .agent
                .cd_change(&vm_uuid, &id, medium)
                .await
                .map_err(|e| driver_errors::agent(&vm, e)),
            Err(e) => Err(e),
        };
        if let Err(e) = changed {
            let _ = db(s.db.write(|t| {
                let old = before.clone().unwrap_or_else(|| NULL_REF.into());
                t.set(field::vbd::EMPTY, &vbd, Value::Bool(old == NULL_REF))?;
                t.set(
                    field::vbd::ALLOWED_OPERATIONS,
                    &vbd,
                    vbd_allowed("CD", old == NULL_REF),
                )?;
                t.set(field::vbd::VDI, &vbd, Value::String(old))
            }));
            return Err(e);
        }
    }
    void()
}

/// VBD.set_mode: as XAPI, only while the VM is halted, and never RW onto a
/// VDI no guest may write (the drive builder enforces that too).
pub(crate) fn vbd_set_mode(s: &Server, p: Vec<Value>) -> ApiResult {
    let mut p = p.into_iter();
    let vbd = pstr(&mut p);
    let mode = pstr(&mut p);
    db(s.db.write(|t| {
        let st = t.state();
        if !st.exists(class::VBD, &vbd) {
            return Err(ApiError::handle_invalid("VBD", &vbd));
        }
        let vm = st.get_str(field::vbd::VM, &vbd).unwrap_or_default();
        let power = crate::ops::query::power(&st, &vm);
        if power != VmPowerState::Halted {
            return Err(errors::vm_bad_power_state(
                vm.as_str(),
                "halted",
                &power.as_str().to_lowercase(),
            ));
        }
        let vdi = st.get_str(field::vbd::VDI, &vbd).unwrap_or_default();
        let empty = st
            .get(field::vbd::EMPTY, &vbd)
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        if mode == "RW"
            && !empty
            && st.exists(class::VDI, &vdi)
            && crate::ops::query::vdi_read_only(st, &vdi)
        {
            return Err(errors::vdi_readonly(vdi.as_str()));
        }
        let v = corral_db::check_field(field::vbd::MODE, Value::String(mode.clone()))?;
        t.set(field::vbd::MODE, &vbd, v)
    }))?;
    void()
}

pub(crate) fn vbd_create(s: &Server, p: Vec<Value>) -> ApiResult {
    let args = p.into_iter().next().unwrap_or(Value::Nil);
    let mut given = create_fields(class::VBD, &args)?;
    let get = given_field;
    let vm = get(&given, field::vbd::VM)
        .map(|v| v.db_string())
        .unwrap_or_default();
    let vdi = get(&given, field::vbd::VDI)
        .map(|v| v.db_string())
        .unwrap_or_else(|| NULL_REF.into());
    let empty = get(&given, field::vbd::EMPTY)
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    let ty = get(&given, field::vbd::TYPE_)
        .map(|v| v.db_string())
        .unwrap_or_else(|| "Disk".into());
    let mode = get(&given, field::vbd::MODE)
        .map(|v| v.db_string())
        .unwrap_or_else(|| "RW".into());
    let r = new_ref();
    db(s.db.write(|t| {
        check_refs(t, class::VBD, &given)?;
        let st = t.state();
        if !st.exists(class::VM, &vm) {
            return Err(ApiError::handle_invalid("VM", &vm));
        }
        if !empty && vdi == NULL_REF {
            return Err(ApiError::handle_invalid("VDI", &vdi));
        }
        if empty && ty != "CD" {
            return Err(errors::vbd_not_removable_media(r.as_str()));
        }
        if !empty {
            let ro = crate::ops::query::vdi_read_only(st, &vdi);
            if ro && mode == "RW" && ty == "Disk" {
                return Err(errors::vdi_readonly(vdi.as_str()));
            }
            if !st
                .get(field::vdi::MANAGED, &vdi)
                .and_then(|v| v.as_bool())
                .unwrap_or(true)
            {
                return Err(errors::vdi_not_managed(vdi.as_str()));
            }
        }
        // userdevice: unique per VM; "autodetect" takes the lowest free slot.
        let used: HashSet<String> = st
            .refs(class::VBD)
            .filter(|b| st.get_str(field::vbd::VM, b).as_deref() == Some(vm.as_str()))
            .filter_map(|b| st.get_str(field::vbd::USERDEVICE, b))
            .collect();
        let mut userdevice = get(&given, field::vbd::USERDEVICE)
            .map(|v| v.db_string())
            .unwrap_or_default();
        if userdevice.is_empty() || userdevice == "autodetect" {
            userdevice = (0..)
                .map(|i: u32| i.to_string())
                .find(|d| !used.contains(d))
                .unwrap_or_default();
        } else if used.contains(&userdevice) {
            return Err(errors::device_already_exists(userdevice.as_str()));
        }
        given.retain(|(i, _)| {
            *i != field::vbd::USERDEVICE.index && *i != field::vbd::CURRENTLY_ATTACHED.index
        });
        given.push((field::vbd::USERDEVICE.index, Value::String(userdevice)));
        given.push((field::vbd::CURRENTLY_ATTACHED.index, Value::Bool(false)));
        if empty {
            given.retain(|(i, _)| *i != field::vbd::VDI.index);
            given.push((field::vbd::VDI.index, Value::str(NULL_REF)));
        }
        given.push((
            field::vbd::ALLOWED_OPERATIONS.index,
            vbd_allowed(&ty, empty),
        ));
        t.create(class::VBD, &r, given.clone())
    }))?;
    Ok(Value::String(r))
}

pub(crate) fn vbd_destroy(s: &Server, p: Vec<Value>) -> ApiResult {
    let vbd = first(p);
    db(s.db.write(|t| {
        assert_detached(t.state(), field::vbd::CURRENTLY_ATTACHED, &vbd)?;
        t.delete(class::VBD, &vbd)
    }))?;
    void()
}

pub(crate) fn vbd_insert(s: &Server, vbd: &str, vdi: &str) -> ApiResult {
    let (vbd, vdi) = (vbd.to_owned(), vdi.to_owned());
    db(s.db.write(|t| {
        let st = t.state();
        if !st.exists(class::VBD, &vbd) {
            return Err(ApiError::handle_invalid("VBD", &vbd));
        }
        if !st.exists(class::VDI, &vdi) {
            return Err(ApiError::handle_invalid("VDI", &vdi));
        }
        if st.get_str(field::vbd::TYPE_, &vbd).as_deref() != Some("CD") {
            return Err(errors::vbd_not_removable_media(vbd.as_str()));
        }
        if !st
            .get(field::vbd::EMPTY, &vbd)
            .and_then(|v| v.as_bool())
            .unwrap_or(true)
        {
            return Err(errors::vbd_not_empty(vbd.as_str()));
        }
        t.set(field::vbd::VDI, &vbd, Value::str(&vdi))?;
        t.set(
            field::vbd::ALLOWED_OPERATIONS,
            &vbd,
            vbd_allowed("CD", false),
        )?;
        t.set(field::vbd::EMPTY, &vbd, Value::Bool(false))
    }))?;
    void()
}

pub(crate) fn vbd_eject(s: &Server, vbd: &str) -> ApiResult {
    let vbd = vbd.to_owned();
    db(s.db.write(|t| {
        let st = t.state();
        if !st.exists(class::VBD, &vbd) {
            return Err(ApiError::handle_invalid("VBD", &vbd));
        }
        if st.get_str(field::vbd::TYPE_, &vbd).as_deref() != Some("CD") {
            return Err(errors::vbd_not_removable_media(vbd.as_str()));
        }
        if st
            .get(field::vbd::EMPTY, &vbd)
            .and_then(|v| v.as_bool())
            .unwrap_or(false)
        {
            return Err(errors::vbd_is_empty(vbd.as_str()));
        }
        t.set(field::vbd::VDI, &vbd, Value::str(NULL_REF))?;
        t.set(
            field::vbd::ALLOWED_OPERATIONS,
            &vbd,
            vbd_allowed("CD", true),
        )?;
        t.set(field::vbd::EMPTY, &vbd, Value::Bool(true))
    }))?;
    void()
}

/// A VBD's `allowed_operations`: only what can run (a CD takes a medium
/// when empty, gives it up when not).
pub(crate) fn vbd_allowed(ty: &str, empty: bool) -> Value {
    let ops: &[&str] = match (ty, empty) {
        ("CD", true) => &["attach", "insert"],
        ("CD", false) => &["attach", "eject"],
        _ => &["attach"],
    };
    Value::string_set(ops.iter().copied())
}

/// VBD user devices a VM may use: "0".."15" (XAPI's range for HVM guests
/// with PV drivers, which virtio gives every Corral guest).
pub(crate) const VBD_DEVICES: u32 = 16;

/// `VM.get_allowed_VBD_devices`: the user devices no VBD of the VM has.
pub(crate) fn allowed_vbd_devices(st: &corral_db::State, vm: &str) -> Vec<String> {
    let used: Vec<String> = crate::ops::query::vbds_of(st, vm)
        .iter()
        .filter_map(|v| st.get_str(field::vbd::USERDEVICE, v))
        .collect();
    (0..VBD_DEVICES)
        .map(|d| d.to_string())
        .filter(|d| !used.contains(d))
        .collect()
}
