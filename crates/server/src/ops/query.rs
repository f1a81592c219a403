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

/// The host whose QEMU runs the VM (Running or Paused); none for a VM
/// without a domain (Halted, Suspended).
pub(crate) fn live_on(st: &corral_db::State, vm: &str) -> Option<String> {
    let p = power(st, vm);
    if p != VmPowerState::Running && p != VmPowerState::Paused {
        return None;
    }
    st.get_str(field::vm::RESIDENT_ON, vm)
        .filter(|h| st.exists(class::HOST, h))
}

/// The VM has a QEMU on `host`.
pub(crate) fn live_at(st: &corral_db::State, host: &str, vm: &str) -> bool {
    live_on(st, vm).as_deref() == Some(host)
}

/// Whether `host_metrics.live` says the host is up.
pub(crate) fn host_live(st: &corral_db::State, host: &str) -> bool {
    let metrics = st.get_str(field::host::METRICS, host).unwrap_or_default();
    st.get(field::host_metrics::LIVE, &metrics)
        .and_then(|v| v.as_bool())
        .unwrap_or(false)
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
    refs_in(st, field::vm::VBDS, vm)
}

/// The references in a set field of `r` (a VM's VBDs, VIFs, …).
pub(crate) fn refs_in(st: &corral_db::State, f: corral_model::FieldId, r: &str) -> Vec<String> {
    st.get(f, r)
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

/// (VM, VM uuid, host) of a VBD whose VM has a domain (Running, Paused).
pub(crate) fn running_uuid(s: &Server, vbd: &str) -> Option<(String, String, String)> {
    let st = s.db.read();
    let vm = st.get_str(field::vbd::VM, vbd)?;
    let host = live_on(&st, &vm)?;
    Some((vm.clone(), vm_uuid(&st, &vm), host))
}

pub(crate) fn busy(s: &Server, vm: &str) -> bool {
    s.db.read()
        .get(field::vm::CURRENT_OPERATIONS, vm)
        .and_then(|v| v.as_struct().map(|m| !m.is_empty()))
        .unwrap_or(false)
}

/// A VDI plugged into a VM running here: (VM uuid, VBD uuid), the names
/// its drive has in the agent.
pub(crate) fn plugged_drive(s: &Server, vdi: &str) -> Option<Plugged> {
    find_plugged(s, vdi, false)
}

/// [`plugged_drive`] when the guest can write it: QEMU holds the image
/// read-write (so only QEMU may read it consistently or move it).
pub(crate) fn plugged_rw_drive(s: &Server, vdi: &str) -> Option<Plugged> {
    find_plugged(s, vdi, true)
}

/// A drive of a live VM that has a VDI plugged.
pub(crate) struct Plugged {
    /// The host whose QEMU holds the image.
    pub host: String,
    pub vm_uuid: String,
    /// The drive's id in the agent: its VBD's uuid.
    pub drive: String,
}

/// The live VM's drive with `vdi` plugged (with `writable`, writable by its
/// guest), on whichever host it runs.
pub(crate) fn find_plugged(s: &Server, vdi: &str, writable: bool) -> Option<Plugged> {
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
        live_on(&st, &vm).map(|host| Plugged {
            host,
            vm_uuid: vm_uuid(&st, &vm),
            drive: st.get_str(field::vbd::UUID, vbd).unwrap_or_default(),
        })
    })
}

/// A VDI no guest may write: marked read-only, or on an ISO library.
pub(crate) fn vdi_read_only(st: &corral_db::State, vdi: &str) -> bool {
    let sr = st.get_str(field::vdi::SR, vdi).unwrap_or_default();
    flag(st, field::vdi::READ_ONLY, vdi)
        || st.get_str(field::sr::CONTENT_TYPE, &sr).as_deref() == Some("iso")
}
