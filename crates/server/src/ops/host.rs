//! host.* messages that act on the host itself.

use crate::context::Server;
use crate::core::call::{ApiResult, Ctx, void};
use crate::init::s;
use crate::ops::query::{int, live_at, power, strmap};
use crate::ops::vm::lifecycle::mark_vm;
use crate::ops::vm::power::{clean_stop, halt};
use crate::ops::vm::state::alert;
use crate::ops::vm::suspend::suspend;
use corral_model::enums::VmOperations;
use corral_model::enums::VmPowerState;
use corral_model::schema::{class, field};
use corral_model::{ApiError, Value};
use std::sync::Arc;
use std::time::Duration;

/// A new self-signed certificate for this host, served from now on.
pub(crate) fn refresh_certificate(s: &Arc<Server>) -> ApiResult {
    let cert = s
        .tls_cert
        .get()
        .ok_or_else(|| ApiError::internal("this host serves no TLS"))?;
    cert.refresh()
        .map_err(|e| ApiError::internal(format!("certificate refresh failed: {e}")))?;
    void()
}

/// The host's VM shutdown policy (Corral extension, seed 002's
/// libvirt-guests made first-class), from `host.other_config`:
/// `vm-shutdown-policy` = `shutdown` (default: clean shutdown in reverse
/// `order`, each given `vm-shutdown-timeout` seconds, default 300, then
/// forced off) | `suspend` | `refuse` (fail while VMs run).
pub(crate) async fn host_shutdown_vms(s: Arc<Server>, c: Ctx, host: &str) -> ApiResult {
    let host = host.to_owned();
    if !s.db.read().exists(class::HOST, &host) {
        return Err(ApiError::handle_invalid("host", &host));
    }
    let h = s.host(&host)?;
    let oc = strmap(s.db.read().get(field::host::OTHER_CONFIG, &host));
    let policy = oc
        .get("vm-shutdown-policy")
        .cloned()
        .unwrap_or_else(|| "shutdown".into());
    let timeout = Duration::from_secs(
        oc.get("vm-shutdown-timeout")
            .and_then(|t| t.parse().ok())
            .unwrap_or(300),
    );
    let mut vms: Vec<(i64, String)> = {
        let st = s.db.read();
        st.refs(class::VM)
            .filter(|vm| live_at(&st, &host, vm))
            .map(|vm| (int(&st, field::vm::ORDER, vm), vm.clone()))
            .collect()
    };
    // Reverse start order: the highest `order` goes first.
    vms.sort_by(|a, b| b.0.cmp(&a.0));
    match policy.as_str() {
        "refuse" if !vms.is_empty() => {
            return Err(ApiError::operation_not_allowed(format!(
                "{} VMs are running and vm-shutdown-policy is refuse",
                vms.len()
            )));
        }
        "suspend" => {
            for (_, vm) in &vms {
                if power(&s.db.read(), vm) == VmPowerState::Running {
                    let _mark = mark_vm(&s, &c, vm, VmOperations::Suspend)?;
                    suspend(Arc::clone(&s), &h, vm).await?;
                }
            }
        }
        _ => {
            for (_, vm) in &vms {
                let _op = mark_vm(&s, &c, vm, VmOperations::Shutdown)?;
                let clean = power(&s.db.read(), vm) == VmPowerState::Running
                    && clean_stop(&s, &h, vm, timeout, None).await.unwrap_or(false);
                halt(&s, &h, vm).await?;
                alert(
                    &s,
                    vm,
                    "VM_SHUTDOWN",
                    5,
                    if clean {
                        "Shut down cleanly for host shutdown"
                    } else {
                        "Forced off for host shutdown (timeout)"
                    },
                );
            }
        }
    }
    void()
}

/// Records which host agent runs VMs here: `software_version:host_driver`,
/// and for the simulator a name_description that `xe host-list` shows.
pub fn record_host_driver(server: &crate::context::Server) {
    const SIM_NOTE: &str = "Simulated host (sim driver): VMs do not really run";
    let kind = server.local().agent.kind();
    let host = server.host_ref.clone();
    let r = server.db.write(|t| {
        let st = t.state();
        let mut sv = st
            .get(field::host::SOFTWARE_VERSION, &host)
            .and_then(|v| v.as_struct().map(<[_]>::to_vec))
            .unwrap_or_default();
        sv.retain(|(k, _)| k != "host_driver");
        sv.push(("host_driver".into(), s(kind)));
        let descr = st
            .get_str(field::host::NAME_DESCRIPTION, &host)
            .unwrap_or_default();
        t.set(field::host::SOFTWARE_VERSION, &host, Value::Struct(sv))?;
        if kind == "sim" && descr.is_empty() {
            t.set(field::host::NAME_DESCRIPTION, &host, s(SIM_NOTE))?;
        } else if kind != "sim" && descr == SIM_NOTE {
            t.set(field::host::NAME_DESCRIPTION, &host, s(""))?;
        }
        Ok::<(), ApiError>(())
    });
    if let Err(e) = r {
        tracing::warn!(error = %e, "cannot record the host driver");
    }
}
