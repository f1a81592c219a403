//! Recording what the agent did: running, stopped, paused, consoles and metrics.

use crate::context::Server;
use crate::core::records::db;
use crate::ops::query::{device_name, strmap, vbds_of, vm_uuid};
use crate::ops::vm::lifecycle::refresh_allowed;
use corral_agent::{Boot, VmConfig};
use corral_model::enums::VmPowerState;
use corral_model::schema::{class, field};
use corral_model::{ApiError, NULL_REF, Value, date, new_ref};
use std::sync::Arc;

/// Consoles are served by the host the VM runs on.
pub(crate) fn console_location(s: &Server, host: &str, console_uuid: &str) -> String {
    let st = s.db.read();
    let addr = st.get_str(field::host::ADDRESS, host).unwrap_or_default();
    format!("https://{addr}/console?uuid={console_uuid}")
}

/// The VM now runs on `host` (or is paused): records, metrics, consoles, VBDs.
pub(crate) fn record_running(
    s: &Server,
    host: &str,
    vm: &str,
    paused: bool,
    domid: i64,
    cfg: &VmConfig,
) -> Result<(), ApiError> {
    let consoles: Vec<(String, String, &str)> = ["vt100", "rfb"]
        .iter()
        .map(|p| {
            let u = corral_model::new_uuid();
            (u.clone(), console_location(s, host, &u), *p)
        })
        .collect();
    db(s.db.write(|t| {
        let st = t.state();
        if !st.exists(class::VM, vm) {
            return Err(ApiError::handle_invalid("VM", vm));
        }
        t.set(
            field::vm::POWER_STATE,
            vm,
            Value::str(live_state(paused).as_str()),
        )?;
        t.set(field::vm::RESIDENT_ON, vm, Value::str(host))?;
        t.set(field::vm::DOMID, vm, Value::Int(domid))?;
        t.set(field::vm::SUSPEND_VDI, vm, Value::str(NULL_REF))?;
        t.set(field::vm::DOMARCH, vm, Value::str("x64"))?;
        crate::ops::vif::set_vifs_attached(t, vm, live_state(paused))?;
        let metrics = ensure_metrics(t, vm)?;
        t.set(
            field::vm_metrics::START_TIME,
            &metrics,
            Value::DateTime(date::now()),
        )?;
        t.set(
            field::vm_metrics::VCPUS_NUMBER,
            &metrics,
            Value::Int(cfg.vcpus),
        )?;
        t.set(
            field::vm_metrics::MEMORY_ACTUAL,
            &metrics,
            Value::Int(cfg.memory_target),
        )?;
        t.set(
            field::vm_metrics::STATE,
            &metrics,
            Value::string_set([if paused { "paused" } else { "running" }]),
        )?;
        t.set(
            field::vm_metrics::LAST_UPDATED,
            &metrics,
            Value::DateTime(date::now()),
        )?;
        t.set(
            field::vm_metrics::CURRENT_DOMAIN_TYPE,
            &metrics,
            Value::str(if matches!(cfg.boot, Boot::Kernel { .. }) {
                "pv_in_pvh"
            } else {
                "hvm"
            }),
        )?;
        t.set(
            field::vm_metrics::HVM,
            &metrics,
            Value::Bool(!matches!(cfg.boot, Boot::Kernel { .. })),
        )?;
        for vbd in vbds_of(t.state(), vm) {
            let ud = t
                .state()
                .get_str(field::vbd::USERDEVICE, &vbd)
                .unwrap_or_default();
            t.set(field::vbd::CURRENTLY_ATTACHED, &vbd, Value::Bool(true))?;
            t.set(field::vbd::DEVICE, &vbd, Value::String(device_name(&ud)))?;
        }
        remove_consoles(t, vm)?;
        for (uuid, loc, proto) in &consoles {
            t.create(
                class::CONSOLE,
                &new_ref(),
                vec![
                    (field::console::UUID.index, Value::str(uuid)),
                    (field::console::PROTOCOL.index, Value::str(*proto)),
                    (field::console::LOCATION.index, Value::str(loc)),
                    (field::console::VM.index, Value::str(vm)),
                    (field::console::OTHER_CONFIG.index, Value::Struct(vec![])),
                ],
            )?;
        }
        refresh_allowed(t, vm)
    }))
}

pub(crate) fn ensure_metrics(t: &mut corral_db::Txn<'_>, vm: &str) -> Result<String, ApiError> {
    let m = t
        .state()
        .get_str(field::vm::METRICS, vm)
        .unwrap_or_default();
    if t.state().exists(class::VM_METRICS, &m) {
        return Ok(m);
    }
    let m = new_ref();
    t.create(class::VM_METRICS, &m, vec![])?;
    t.set(field::vm::METRICS, vm, Value::str(&m))?;
    Ok(m)
}

pub(crate) fn remove_consoles(t: &mut corral_db::Txn<'_>, vm: &str) -> Result<(), ApiError> {
    let cons: Vec<String> = t
        .state()
        .refs(class::CONSOLE)
        .filter(|c| t.state().get_str(field::console::VM, c).as_deref() == Some(vm))
        .cloned()
        .collect();
    for c in cons {
        t.delete(class::CONSOLE, &c)?;
    }
    Ok(())
}

/// The VM no longer runs: Halted (or Suspended with its image).
pub(crate) fn record_stopped(
    s: &Server,
    vm: &str,
    state: VmPowerState,
    suspend_vdi: Option<&str>,
) -> Result<(), ApiError> {
    db(s.db.write(|t| {
        if !t.state().exists(class::VM, vm) {
            return Ok(());
        }
        t.set(field::vm::POWER_STATE, vm, Value::str(state.as_str()))?;
        t.set(field::vm::RESIDENT_ON, vm, Value::str(NULL_REF))?;
        t.set(field::vm::DOMID, vm, Value::Int(-1))?;
        t.set(
            field::vm::SUSPEND_VDI,
            vm,
            Value::str(suspend_vdi.unwrap_or(NULL_REF)),
        )?;
        for vbd in vbds_of(t.state(), vm) {
            t.set(field::vbd::CURRENTLY_ATTACHED, &vbd, Value::Bool(false))?;
        }
        crate::ops::vif::set_vifs_attached(t, vm, state)?;
        remove_consoles(t, vm)?;
        let metrics = t
            .state()
            .get_str(field::vm::METRICS, vm)
            .unwrap_or_default();
        if t.state().exists(class::VM_METRICS, &metrics) {
            t.set(
                field::vm_metrics::STATE,
                &metrics,
                Value::string_set([state.as_str().to_lowercase()]),
            )?;
            t.set(field::vm_metrics::MEMORY_ACTUAL, &metrics, Value::Int(0))?;
            t.set(
                field::vm_metrics::LAST_UPDATED,
                &metrics,
                Value::DateTime(date::now()),
            )?;
        }
        let gm = t
            .state()
            .get_str(field::vm::GUEST_METRICS, vm)
            .unwrap_or_default();
        if t.state().exists(class::VM_GUEST_METRICS, &gm) {
            t.delete(class::VM_GUEST_METRICS, &gm)?;
        }
        t.set(field::vm::GUEST_METRICS, vm, Value::str(NULL_REF))?;
        refresh_allowed(t, vm)
    }))
}

/// The power state of a VM with a domain.
fn live_state(paused: bool) -> VmPowerState {
    if paused {
        VmPowerState::Paused
    } else {
        VmPowerState::Running
    }
}

pub(crate) fn set_paused(s: &Server, vm: &str, paused: bool) -> Result<(), ApiError> {
    db(s.db.write(|t| {
        t.set(
            field::vm::POWER_STATE,
            vm,
            Value::str(live_state(paused).as_str()),
        )?;
        let metrics = t
            .state()
            .get_str(field::vm::METRICS, vm)
            .unwrap_or_default();
        if t.state().exists(class::VM_METRICS, &metrics) {
            t.set(
                field::vm_metrics::STATE,
                &metrics,
                Value::string_set([if paused { "paused" } else { "running" }]),
            )?;
        }
        refresh_allowed(t, vm)
    }))
}

pub(crate) fn alert(s: &Server, vm: &str, name: &str, priority: i64, body: &str) {
    let uuid = vm_uuid(&s.db.read(), vm);
    if let Err(e) = crate::core::alerts::create_message(&s.db, name, priority, "VM", &uuid, body) {
        tracing::warn!(vm = %uuid, error = %e, "cannot record message");
    }
}

pub(crate) async fn drop_suspend_image(s: &Arc<Server>, vm: &str) {
    let vdi =
        s.db.read()
            .get_str(field::vm::SUSPEND_VDI, vm)
            .unwrap_or_default();
    if s.db.read().exists(class::VDI, &vdi) {
        let _ = crate::ops::vdi::vdi_destroy(Arc::clone(s), &vdi).await;
    }
}

/// Suspend images made for `vm` that it does not point at (a suspend that
/// never finished).
pub(crate) async fn drop_unused_suspend_images(s: &Arc<Server>, vm: &str) {
    let stale: Vec<String> = {
        let st = s.db.read();
        let uuid = vm_uuid(&st, vm);
        let keep = st.get_str(field::vm::SUSPEND_VDI, vm).unwrap_or_default();
        st.refs(class::VDI)
            .filter(|v| **v != keep)
            .filter(|v| st.get_str(field::vdi::TYPE_, v).as_deref() == Some("suspend"))
            .filter(|v| strmap(st.get(field::vdi::OTHER_CONFIG, v)).get(SUSPEND_OF) == Some(&uuid))
            .cloned()
            .collect()
    };
    for v in stale {
        let _ = crate::ops::vdi::vdi_destroy(Arc::clone(s), &v).await;
    }
}

/// `VDI.other_config` key of a suspend image: the uuid of its VM.
pub(crate) const SUSPEND_OF: &str = "corral-suspend-of";
