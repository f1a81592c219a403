//! VIF.create and destroy, the NICs a VM starts with, and the devices it
//! may still use.

use crate::context::Server;
use crate::context::hosts::HostHandle;
use crate::core::call::{ApiResult, void};
use crate::core::driver_errors;
use crate::core::marks::{Mark, Want};
use crate::core::records::{check_refs, create_fields, db, first, given_field};
use crate::ops::query::{power, strmap};
use corral_agent::Nic;
use corral_model::enums::VmPowerState;
use corral_model::errors;
use corral_model::schema::{class, field};
use corral_model::{ApiError, Value, new_ref};
use std::collections::BTreeMap;

pub(crate) mod port;

/// VIF devices are "0".."15" (XAPI's limit for HVM and PV guests alike).
pub(crate) const VIF_DEVICES: u32 = 16;

/// The VM's VIFs.
pub(crate) fn vifs_of(st: &corral_db::State, vm: &str) -> Vec<String> {
    crate::ops::query::refs_in(st, field::vm::VIFS, vm)
}

/// `VM.get_allowed_VIF_devices`: the devices no VIF of the VM has, in order.
pub(crate) fn allowed_vif_devices(st: &corral_db::State, vm: &str) -> Vec<String> {
    let used: Vec<String> = vifs_of(st, vm)
        .iter()
        .filter_map(|v| st.get_str(field::vif::DEVICE, v))
        .collect();
    (0..VIF_DEVICES)
        .map(|d| d.to_string())
        .filter(|d| !used.contains(d))
        .collect()
}

/// A VIF's `allowed_operations` for its VM's power state: plug and unplug
/// only on a running VM, and only the one that changes something.
pub(crate) fn vif_allowed(state: VmPowerState, attached: bool) -> Value {
    let ops: &[&str] = match (state, attached) {
        (VmPowerState::Running, true) => &["attach", "unplug"],
        (VmPowerState::Running, false) => &["attach", "plug"],
        _ => &["attach"],
    };
    Value::string_set(ops.iter().copied())
}

/// The NIC model `platform:nic_type` asks for (virtio-net by default).
pub(crate) fn nic_model(platform: &BTreeMap<String, String>) -> Result<&'static str, ApiError> {
    Ok(match platform.get("nic_type").map(String::as_str) {
        None | Some("") | Some("virtio") | Some("virtio-net") | Some("virtio-net-pci") => {
            "virtio-net-pci"
        }
        Some("e1000") => "e1000",
        Some("rtl8139") => "rtl8139",
        Some(other) => return Err(ApiError::invalid_value("platform:nic_type", other)),
    })
}

/// The agent's NIC for one VIF: on its network's bridge with the VIF's
/// MTU (the network's when the VIF has none).
fn nic_of(st: &corral_db::State, vif: &str, model: &str) -> Result<Nic, ApiError> {
    let device = st.get_str(field::vif::DEVICE, vif).unwrap_or_default();
    let Ok(device) = device.parse::<u32>() else {
        return Err(errors::invalid_device(device));
    };
    let network = st.get_str(field::vif::NETWORK, vif).unwrap_or_default();
    if !st.exists(class::NETWORK, &network) {
        return Err(ApiError::handle_invalid("network", &network));
    }
    let bridge = st
        .get_str(field::network::BRIDGE, &network)
        .unwrap_or_default();
    let mtu = match st.get(field::vif::MTU, vif).and_then(|v| v.as_int()) {
        Some(m) if m > 0 => m,
        _ => st
            .get(field::network::MTU, &network)
            .and_then(|v| v.as_int())
            .unwrap_or(1500),
    };
    Ok(Nic {
        device,
        mac: st
            .get_str(field::vif::MAC, vif)
            .unwrap_or_default()
            .to_ascii_lowercase(),
        model: model.into(),
        bridge,
        mtu: u32::try_from(mtu).unwrap_or(1500),
    })
}

/// The agent's NICs for the VM's VIFs, by device.
pub(crate) fn nics_of(st: &corral_db::State, vm: &str) -> Result<Vec<Nic>, ApiError> {
    let model = nic_model(&strmap(st.get(field::vm::PLATFORM, vm)))?;
    let mut nics = vifs_of(st, vm)
        .iter()
        .map(|vif| nic_of(st, vif, model))
        .collect::<Result<Vec<_>, _>>()?;
    nics.sort_by_key(|n| n.device);
    Ok(nics)
}

/// What VIF.plug and VIF.unplug need: the VM, its uuid, its host's
/// handle and the NIC, after XAPI's checks (a running VM; the VIF in the
/// other state than asked).
fn hotplug_parts(
    s: &Server,
    vif: &str,
    plugging: bool,
) -> Result<(String, String, HostHandle, Nic), ApiError> {
    let st = s.db.read();
    if !st.exists(class::VIF, vif) {
        return Err(ApiError::handle_invalid("VIF", vif));
    }
    let vm = st.get_str(field::vif::VM, vif).unwrap_or_default();
    let state = power(&st, &vm);
    if state != VmPowerState::Running {
        return Err(errors::vm_bad_power_state(
            vm.as_str(),
            "running",
            state.as_str().to_lowercase().as_str(),
        ));
    }
    let attached = st
        .get(field::vif::CURRENTLY_ATTACHED, vif)
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    match (plugging, attached) {
        (true, true) => return Err(errors::device_already_attached(vif)),
        (false, false) => return Err(errors::device_already_detached(vif)),
        _ => {}
    }
    let model = nic_model(&strmap(st.get(field::vm::PLATFORM, &vm)))?;
    let nic = nic_of(&st, vif, model)?;
    let uuid = crate::ops::query::vm_uuid(&st, &vm);
    let host = st.get_str(field::vm::RESIDENT_ON, &vm).unwrap_or_default();
    drop(st);
    Ok((vm, uuid, s.host(&host)?, nic))
}

fn set_attached(s: &Server, vif: &str, attached: bool) -> Result<(), ApiError> {
    db(s.db.write(|t| {
        if !t.state().exists(class::VIF, vif) {
            return Ok(());
        }
        let vm = t.state().get_str(field::vif::VM, vif).unwrap_or_default();
        let state = power(t.state(), &vm);
        t.set(field::vif::CURRENTLY_ATTACHED, vif, Value::Bool(attached))?;
        t.set(
            field::vif::ALLOWED_OPERATIONS,
            vif,
            vif_allowed(state, attached),
        )
    }))
}

/// A VIF's `allowed_operations` from its VM's state, its own and its
/// marks: any operation running on it blocks every other (as XAPI's).
fn refresh_vif(t: &mut corral_db::Txn<'_>, vif: &str) -> Result<(), ApiError> {
    let st = t.state();
    if !st.exists(class::VIF, vif) {
        return Ok(());
    }
    let busy = st
        .get(field::vif::CURRENT_OPERATIONS, vif)
        .and_then(|v| v.as_struct().map(|m| !m.is_empty()))
        .unwrap_or(false);
    let vm = st.get_str(field::vif::VM, vif).unwrap_or_default();
    let attached = st
        .get(field::vif::CURRENTLY_ATTACHED, vif)
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    let allowed = if busy {
        Value::Array(vec![])
    } else {
        vif_allowed(power(st, &vm), attached)
    };
    t.set_if_changed(field::vif::ALLOWED_OPERATIONS, vif, allowed)
        .map(|_| ())
}

/// Marks `op` on the VIF for the mark's lifetime; another operation on it
/// is `OTHER_OPERATION_IN_PROGRESS`.
pub(crate) fn mark_vif(s: &Server, vif: &str, op: &str) -> Result<Mark, ApiError> {
    mark_vif_in(&s.db, vif, op)
}

fn mark_vif_in(db: &std::sync::Arc<corral_db::Db>, vif: &str, op: &str) -> Result<Mark, ApiError> {
    let check = |st: &corral_db::State| {
        if !st.exists(class::VIF, vif) {
            return Err(ApiError::handle_invalid("VIF", vif));
        }
        let cur = st
            .get(field::vif::CURRENT_OPERATIONS, vif)
            .and_then(|v| v.as_struct().map(<[_]>::to_vec))
            .unwrap_or_default();
        match cur.first() {
            Some((task, other)) => Err(errors::other_operation_in_progress(
                "VIF",
                vif,
                other.as_str().unwrap_or_default(),
                task.as_str(),
            )),
            None => Ok(()),
        }
    };
    Mark::take(
        db,
        new_ref(),
        &[Want {
            current: field::vif::CURRENT_OPERATIONS,
            obj: vif,
            op,
            check: Some(&check),
            refresh: refresh_vif,
        }],
    )
}

/// `VIF.plug`: hot-plugs the NIC into the running VM on its host.
pub(crate) async fn vif_plug(s: &Server, vif: &str) -> ApiResult {
    let _mark = mark_vif(s, vif, "plug")?;
    let (vm, uuid, h, nic) = hotplug_parts(s, vif, true)?;
    let mtu = {
        let st = s.db.read();
        bridges_of(&st, &vm)
            .into_iter()
            .find(|(b, _)| *b == nic.bridge)
            .map(|(_, m)| m)
            .unwrap_or(nic.mtu)
    };
    h.net
        .ensure_bridge(&nic.bridge, mtu)
        .await
        .map_err(|e| driver_errors::network(&nic.bridge, e))?;
    port::apply_vif(s, &h, vif, true).await?;
    h.agent
        .nic_attach(&uuid, nic)
        .await
        .map_err(|e| driver_errors::agent(&vm, e))?;
    set_attached(s, vif, true)?;
    void()
}

/// `VIF.unplug` (the guest must let the NIC go: `DEVICE_DETACH_REJECTED`
/// when it does not) and `VIF.unplug_force` (the backend goes at once).
pub(crate) async fn vif_unplug(s: &Server, vif: &str, force: bool) -> ApiResult {
    let _mark = mark_vif(s, vif, "unplug")?;
    let (vm, uuid, h, nic) = hotplug_parts(s, vif, false)?;
    match h.agent.nic_detach(&uuid, nic.device, force).await {
        Ok(()) => {}
        Err(corral_agent::AgentError::Rejected(m)) => {
            return Err(errors::device_detach_rejected("VIF", vif, m.as_str()));
        }
        Err(e) => return Err(driver_errors::agent(&vm, e)),
    }
    set_attached(s, vif, false)?;
    port::apply_vif(s, &h, vif, false).await?;
    void()
}

/// The bridges (and their networks' MTUs) the VM's VIFs are on.
pub(crate) fn bridges_of(st: &corral_db::State, vm: &str) -> Vec<(String, u32)> {
    let mut out: Vec<(String, u32)> = Vec::new();
    for vif in vifs_of(st, vm) {
        let network = st.get_str(field::vif::NETWORK, &vif).unwrap_or_default();
        let Some(bridge) = st.get_str(field::network::BRIDGE, &network) else {
            continue;
        };
        let mtu = st
            .get(field::network::MTU, &network)
            .and_then(|v| v.as_int())
            .and_then(|m| u32::try_from(m).ok())
            .unwrap_or(1500);
        if !bridge.is_empty() && !out.iter().any(|(b, _)| *b == bridge) {
            out.push((bridge, mtu));
        }
    }
    out
}

/// `VIF.create`: XAPI's checks (a decimal device, unique in the VM; a
/// well-formed MAC, or one made from the VM's `mac_seed`), then the record.
/// `currently_attached` is kept only for a suspended VM, whose VIFs resume
/// attached.
pub(crate) fn vif_create(s: &Server, p: Vec<Value>) -> ApiResult {
    let args = p.into_iter().next().unwrap_or(Value::Nil);
    let mut given = create_fields(class::VIF, &args)?;
    let get = |f| given_field(&given, f).map(|v: Value| v.db_string());
    let vm = get(field::vif::VM).unwrap_or_default();
    let network = get(field::vif::NETWORK).unwrap_or_default();
    let device = get(field::vif::DEVICE).unwrap_or_default();
    let mac = get(field::vif::MAC).unwrap_or_default();
    if device.is_empty() || !device.bytes().all(|b| b.is_ascii_digit()) {
        return Err(errors::invalid_device(device));
    }
    if !mac.is_empty() && !corral_net::mac::is_valid(&mac) {
        return Err(errors::mac_invalid(mac));
    }
    for f in [field::vif::IPV4_ALLOWED, field::vif::IPV6_ALLOWED] {
        if let Some(v) = given_field(&given, f) {
            port::check_set(class::VIF, f, &v)?;
        }
    }
    let r = new_ref();
    db(s.db.write(|t| {
        check_refs(t, class::VIF, &given)?;
        let st = t.state();
        if !st.exists(class::VM, &vm) {
            return Err(ApiError::handle_invalid("VM", &vm));
        }
        if !st.exists(class::NETWORK, &network) {
            return Err(ApiError::handle_invalid("network", &network));
        }
        let taken = vifs_of(st, &vm)
            .iter()
            .any(|v| st.get_str(field::vif::DEVICE, v).as_deref() == Some(device.as_str()));
        if taken {
            return Err(errors::device_already_exists(device.as_str()));
        }
        let state = power(st, &vm);
        let (mac, generated) = if mac.is_empty() {
            (seeded_mac(t, &vm, &device)?, true)
        } else {
            (mac.clone(), false)
        };
        let st = t.state();
        let attached = state == VmPowerState::Suspended
            && given_field(&given, field::vif::CURRENTLY_ATTACHED).and_then(|v| v.as_bool())
                == Some(true);
        let mtu = match given_field(&given, field::vif::MTU).and_then(|v| v.as_int()) {
            Some(m) if m > 0 => m,
            _ => st
                .get(field::network::MTU, &network)
                .and_then(|v| v.as_int())
                .unwrap_or(1500),
        };
        let replaced = [
            field::vif::MAC,
            field::vif::MTU,
            field::vif::CURRENTLY_ATTACHED,
            field::vif::MAC_AUTOGENERATED,
            field::vif::ALLOWED_OPERATIONS,
        ];
        given.retain(|(i, _)| !replaced.iter().any(|f| f.index == *i));
        given.extend([
            (field::vif::MAC.index, Value::String(mac)),
            (field::vif::MTU.index, Value::Int(mtu)),
            (field::vif::CURRENTLY_ATTACHED.index, Value::Bool(attached)),
            (field::vif::MAC_AUTOGENERATED.index, Value::Bool(generated)),
            (
                field::vif::ALLOWED_OPERATIONS.index,
                vif_allowed(state, attached),
            ),
        ]);
        t.create(class::VIF, &r, given.clone())
    }))?;
    Ok(Value::String(r))
}

/// The MAC XAPI would give the VIF: from the VM's `other_config:mac_seed`,
/// which a VM made before Corral kept seeds gets now.
fn seeded_mac(t: &mut corral_db::Txn<'_>, vm: &str, device: &str) -> Result<String, ApiError> {
    let st = t.state();
    let mut other = strmap(st.get(field::vm::OTHER_CONFIG, vm));
    let seed = match other.get("mac_seed") {
        Some(seed) => seed.clone(),
        None => {
            let seed = corral_model::new_uuid();
            other.insert("mac_seed".into(), seed.clone());
            let map = other
                .into_iter()
                .map(|(k, v)| (k, Value::String(v)))
                .collect();
            t.set(field::vm::OTHER_CONFIG, vm, Value::Struct(map))?;
            seed
        }
    };
    let device: u32 = device.parse().map_err(|_| errors::invalid_device(device))?;
    Ok(corral_net::mac::from_seed(&seed, device))
}

/// The VIFs of `src` again for its clone `dst`, detached, with MACs from
/// the clone's own seed.
pub(crate) fn copy_vifs(
    t: &mut corral_db::Txn<'_>,
    src: &str,
    dst: &str,
    seed: &str,
) -> Result<(), ApiError> {
    for vif in vifs_of(t.state(), src) {
        let Some(row) = t.state().row(class::VIF, &vif) else {
            continue;
        };
        let mut fields: Vec<(usize, Value)> = row.fields.iter().cloned().enumerate().collect();
        let device = t
            .state()
            .get_str(field::vif::DEVICE, &vif)
            .unwrap_or_default();
        let mac = device
            .parse::<u32>()
            .map(|d| corral_net::mac::from_seed(seed, d))
            .unwrap_or_else(|_| corral_net::mac::random());
        for (f, v) in [
            (field::vif::UUID, Value::str("")),
            (field::vif::VM, Value::str(dst)),
            (field::vif::MAC, Value::String(mac)),
            (field::vif::MAC_AUTOGENERATED, Value::Bool(true)),
            (field::vif::CURRENTLY_ATTACHED, Value::Bool(false)),
            (field::vif::CURRENT_OPERATIONS, Value::Struct(vec![])),
            (field::vif::METRICS, Value::str(corral_model::NULL_REF)),
            (
                field::vif::ALLOWED_OPERATIONS,
                vif_allowed(VmPowerState::Halted, false),
            ),
        ] {
            fields[f.index].1 = v;
        }
        fields.retain(|(i, _)| class::VIF.def().fields[*i].rel.is_none());
        t.create(class::VIF, &new_ref(), fields)?;
    }
    Ok(())
}

/// `VIF.destroy`: not while it is plugged into a running VM.
pub(crate) fn vif_destroy(s: &Server, p: Vec<Value>) -> ApiResult {
    let vif = first(p);
    db(s.db.write(|t| {
        let st = t.state();
        if !st.exists(class::VIF, &vif) {
            return Err(ApiError::handle_invalid("VIF", &vif));
        }
        let vm = st.get_str(field::vif::VM, &vif).unwrap_or_default();
        let attached = st
            .get(field::vif::CURRENTLY_ATTACHED, &vif)
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        if attached && power(st, &vm) == VmPowerState::Running {
            return Err(errors::operation_not_allowed(
                "VIF currently attached to a running VM",
            ));
        }
        delete_vif(t, &vif)
    }))?;
    void()
}

/// Deletes a VIF record with its metrics.
pub(crate) fn delete_vif(t: &mut corral_db::Txn<'_>, vif: &str) -> Result<(), ApiError> {
    let metrics = t
        .state()
        .get_str(field::vif::METRICS, vif)
        .unwrap_or_default();
    if t.state().exists(class::VIF_METRICS, &metrics) {
        t.delete(class::VIF_METRICS, &metrics)?;
    }
    t.delete(class::VIF, vif)
}

/// Writes a VIF's traffic rates (KiB/s, as the guest sees them) into its
/// VIF_metrics, made on first use; only a change is a write.
pub(crate) fn write_vif_rates(
    t: &mut corral_db::Txn<'_>,
    vif: &str,
    read_kbs: f64,
    write_kbs: f64,
) -> Result<(), ApiError> {
    if !t.state().exists(class::VIF, vif) {
        return Ok(());
    }
    let mut metrics = t
        .state()
        .get_str(field::vif::METRICS, vif)
        .unwrap_or_default();
    if !t.state().exists(class::VIF_METRICS, &metrics) {
        metrics = new_ref();
        t.create(class::VIF_METRICS, &metrics, vec![])?;
        t.set(field::vif::METRICS, vif, Value::str(&metrics))?;
    }
    // Rounded: idle guests' counters jitter by a few bytes.
    let round = |k: f64| (k * 1000.0).round() / 1000.0;
    let mut changed = t.set_if_changed(
        field::vif_metrics::IO_READ_KBS,
        &metrics,
        Value::Float(round(read_kbs)),
    )?;
    changed |= t.set_if_changed(
        field::vif_metrics::IO_WRITE_KBS,
        &metrics,
        Value::Float(round(write_kbs)),
    )?;
    if changed {
        t.set(
            field::vif_metrics::LAST_UPDATED,
            &metrics,
            Value::DateTime(corral_model::date::now()),
        )?;
    }
    Ok(())
}

/// The VM's VIFs as its power state now leaves them: attached while it
/// runs or is paused or suspended, detached when halted.
pub(crate) fn set_vifs_attached(
    t: &mut corral_db::Txn<'_>,
    vm: &str,
    state: VmPowerState,
) -> Result<(), ApiError> {
    let attached = matches!(
        state,
        VmPowerState::Running | VmPowerState::Paused | VmPowerState::Suspended
    );
    for vif in vifs_of(t.state(), vm) {
        t.set(field::vif::CURRENTLY_ATTACHED, &vif, Value::Bool(attached))?;
        t.set(
            field::vif::ALLOWED_OPERATIONS,
            &vif,
            vif_allowed(state, attached),
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One operation at a time on a VIF, and none allowed while it runs.
    #[test]
    fn a_running_operation_blocks_the_others() {
        let db = std::sync::Arc::new(corral_db::Db::in_memory());
        let (vm, vif) = ("OpaqueRef:vm", "OpaqueRef:vif");
        db.write(|t| {
            t.create(
                class::VM,
                vm,
                vec![(field::vm::POWER_STATE.index, Value::str("Running"))],
            )?;
            t.create(
                class::VIF,
                vif,
                vec![
                    (field::vif::VM.index, Value::str(vm)),
                    (field::vif::DEVICE.index, Value::str("0")),
                    (field::vif::CURRENTLY_ATTACHED.index, Value::Bool(true)),
                ],
            )
        })
        .expect("records");
        let allowed = |db: &corral_db::Db| {
            db.read()
                .get(field::vif::ALLOWED_OPERATIONS, vif)
                .and_then(|v| v.as_array().map(<[Value]>::len))
                .unwrap_or(0)
        };
        let mark = mark_vif_in(&db, vif, "unplug").expect("first operation");
        assert_eq!(allowed(&db), 0, "nothing is allowed while unplug runs");
        let err = mark_vif_in(&db, vif, "plug")
            .err()
            .expect("a second operation is refused");
        assert_eq!(err.code, "OTHER_OPERATION_IN_PROGRESS");
        assert_eq!(
            err.params[..3],
            ["VIF".to_string(), vif.into(), "unplug".into()]
        );
        drop(mark);
        assert_eq!(allowed(&db), 2, "attach and unplug again");
        assert!(mark_vif_in(&db, vif, "plug").is_ok());
        assert!(mark_vif_in(&db, "OpaqueRef:none", "plug").is_err());
    }
}
