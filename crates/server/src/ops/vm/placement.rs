//! Whether a VM may start on a host: memory and host checks.

use crate::context::Server;
use crate::context::hosts::HostHandle;
use crate::core::call::{ApiResult, void};
use crate::ops::query::{flag, int, live_at};
use crate::ops::vm::config::build_config;
use corral_agent::VmConfig;
use corral_model::schema::{class, field};
use corral_model::{ApiError, errors};

/// Host memory kept back from VMs (the host's own needs).
pub(crate) const HOST_RESERVE: i64 = 512 * 1024 * 1024;

/// (total, free) memory of `h` for a new VM, as XAPI's `compute_free_memory`.
pub fn host_free_memory(h: &HostHandle, st: &corral_db::State) -> (i64, i64) {
    let metrics = st
        .get_str(field::host::METRICS, &h.host)
        .unwrap_or_default();
    let total = int(st, field::host_metrics::MEMORY_TOTAL, &metrics);
    let mut used = HOST_RESERVE;
    for vm in st.refs(class::VM) {
        if live_at(st, &h.host, vm) {
            let m = int(st, field::vm::MEMORY_STATIC_MAX, vm);
            used += m + h.agent.memory_overhead(m);
        }
    }
    (total, (total - used).max(0))
}

pub(crate) fn check_memory(s: &Server, h: &HostHandle, cfg: &VmConfig) -> Result<(), ApiError> {
    let st = s.db.read();
    let (_, free) = host_free_memory(h, &st);
    let needed = cfg.memory + h.agent.memory_overhead(cfg.memory);
    if needed > free {
        return Err(errors::host_not_enough_free_memory(
            needed.to_string(),
            free.to_string(),
        ));
    }
    Ok(())
}

/// A host asked for by name (`start_on`, `resume_on`, `assert_can_boot_here`)
/// must exist, be live and be enabled; then its drivers are reached.
pub(crate) fn check_host(s: &Server, h: &str) -> Result<HostHandle, ApiError> {
    {
        let st = s.db.read();
        if !st.exists(class::HOST, h) {
            return Err(ApiError::handle_invalid("host", h));
        }
        let metrics = st.get_str(field::host::METRICS, h).unwrap_or_default();
        if !flag(&st, field::host_metrics::LIVE, &metrics) {
            return Err(errors::host_offline(h));
        }
        if !flag(&st, field::host::ENABLED, h) {
            return Err(errors::host_disabled(h));
        }
    }
    s.host(h)
}

pub(crate) fn vm_assert_can_boot_here(s: &Server, vm: &str, host: &str) -> ApiResult {
    if !s.db.read().exists(class::VM, vm) {
        return Err(ApiError::handle_invalid("VM", vm));
    }
    let h = check_host(s, host)?;
    let cfg = build_config(s, vm)?;
    check_memory(s, &h, &cfg)?;
    void()
}
