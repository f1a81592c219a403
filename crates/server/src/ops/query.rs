//! Read-only questions about VM records.

use crate::context::Server;
use corral_model::Value;
use corral_model::enums::VmPowerState;
use corral_model::schema::{class, field};
use std::collections::BTreeMap;

/// A VM's power state (Halted for a record that has none it knows).
pub(crate) fn power(st: &corral_db::State, vm: &str) -> VmPowerState {
    st.get_str(field::vm::POWER_STATE, vm)
        .as_deref()
        .and_then(VmPowerState::parse)
        .unwrap_or(VmPowerState::Halted)
}

/// The VM has a QEMU on this host: Running or Paused, resident here.
pub(crate) fn live_here(s: &Server, st: &corral_db::State, vm: &str) -> bool {
    let p = power(st, vm);
    (p == VmPowerState::Running || p == VmPowerState::Paused)
        && st.get_str(field::vm::RESIDENT_ON, vm).as_deref() == Some(s.host_ref.as_str())
}

/// A map field as read from the database (absent: empty).
pub(crate) fn strmap(v: Option<Value>) -> BTreeMap<String, String> {
    v.map(|v| crate::core::records::strmap(&v))
        .unwrap_or_default()
}

pub(crate) fn int(st: &corral_db::State, f: corral_model::FieldId, r: &str) -> i64 {
    st.get(f, r).and_then(|v| v.as_int()).unwrap_or(0)
}

pub(crate) fn flag(st: &corral_db::State, f: corral_model::FieldId, r: &str) -> bool {
    st.get(f, r).and_then(|v| v.as_bool()).unwrap_or(false)
}

pub(crate) fn vm_uuid(st: &corral_db::State, vm: &str) -> String {
    st.get_str(field::vm::UUID, vm).unwrap_or_default()
}

pub(crate) fn vm_by_uuid(s: &Server, uuid: &str) -> Option<String> {
    s.db.read().by_uuid(class::VM, uuid).cloned()
}

pub(crate) fn vbds_of(st: &corral_db::State, vm: &str) -> Vec<String> {
    st.get(field::vm::VBDS, vm)
        .and_then(|v| {
            v.as_array().map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_owned))
                    .collect()
            })
        })
        .unwrap_or_default()
}

/// Device name for a VBD's `userdevice` (XenServer's `xvd<letter>`).
pub(crate) fn device_name(userdevice: &str) -> String {
    let n: u32 = userdevice.parse().unwrap_or(0);
    let letter = char::from_u32('a' as u32 + n.min(25)).unwrap_or('a');
    format!("xvd{letter}")
}

pub(crate) fn running_uuid(s: &Server, vbd: &str) -> Option<(String, String)> {
    let st = s.db.read();
    let vm = st.get_str(field::vbd::VM, vbd)?;
    let p = power(&st, &vm);
    (p == VmPowerState::Running || p == VmPowerState::Paused)
        .then(|| (vm.clone(), vm_uuid(&st, &vm)))
}

pub(crate) fn busy(s: &Server, vm: &str) -> bool {
    s.db.read()
        .get(field::vm::CURRENT_OPERATIONS, vm)
        .and_then(|v| v.as_struct().map(|m| !m.is_empty()))
        .unwrap_or(false)
}

/// A VDI plugged into a VM running here: (VM uuid, VBD uuid), the names
/// its drive has in the agent.
pub(crate) fn plugged_drive(s: &Server, vdi: &str) -> Option<(String, String)> {
    find_plugged(s, vdi, false)
}

/// [`plugged_drive`] when the guest can write it: QEMU holds the image
/// read-write (so only QEMU may read it consistently or move it).
pub(crate) fn plugged_rw_drive(s: &Server, vdi: &str) -> Option<(String, String)> {
    find_plugged(s, vdi, true)
}

/// (VM uuid, VBD uuid) of a running VM here with `vdi` plugged (and, with
/// `writable`, writable by its guest).
pub(crate) fn find_plugged(s: &Server, vdi: &str, writable: bool) -> Option<(String, String)> {
    let st = s.db.read();
    if writable && vdi_read_only(&st, vdi) {
        return None;
    }
    st.refs(class::VBD).find_map(|vbd| {
        if st.get_str(field::vbd::VDI, vbd).as_deref() != Some(vdi)
            || !flag(&st, field::vbd::CURRENTLY_ATTACHED, vbd)
            || (writable && st.get_str(field::vbd::MODE, vbd).as_deref() != Some("RW"))
        {
            return None;
        }
        let vm = st.get_str(field::vbd::VM, vbd)?;
        live_here(s, &st, &vm).then(|| {
            (
                vm_uuid(&st, &vm),
                st.get_str(field::vbd::UUID, vbd).unwrap_or_default(),
            )
        })
    })
}

/// A VDI no guest may write: marked read-only, or on an ISO library.
pub(crate) fn vdi_read_only(st: &corral_db::State, vdi: &str) -> bool {
    let sr = st.get_str(field::vdi::SR, vdi).unwrap_or_default();
    flag(st, field::vdi::READ_ONLY, vdi)
        || st.get_str(field::sr::CONTENT_TYPE, &sr).as_deref() == Some("iso")
}
