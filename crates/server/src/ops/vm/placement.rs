//! Whether a VM may start on a host: memory and host checks.

use crate::context::Server;
use crate::core::call::{ApiResult, void};
use crate::ops::query::{flag, int, live_here};
use crate::ops::vm::config::build_config;
use corral_agent::VmConfig;
use corral_model::schema::{class, field};
use corral_model::{ApiError, Value, errors};
use std::sync::Arc;

/// Host memory kept back from VMs (the host's own needs).
pub(crate) const HOST_RESERVE: i64 = 512 * 1024 * 1024;

/// Free host memory for a new VM, as XAPI's `compute_free_memory`.
pub fn host_free_memory(s: &Server, st: &corral_db::State) -> (i64, i64) {
    let metrics = st
        .get_str(field::host::METRICS, &s.host_ref)
        .unwrap_or_default();
    let total = int(st, field::host_metrics::MEMORY_TOTAL, &metrics);
    let mut used = HOST_RESERVE;
    for vm in st.refs(class::VM) {
        if live_here(s, st, vm) {
            let m = int(st, field::vm::MEMORY_STATIC_MAX, vm);
            used += m + s.agent.memory_overhead(m);
        }
    }
    (total, (total - used).max(0))
}

pub(crate) fn check_memory(s: &Server, cfg: &VmConfig) -> Result<(), ApiError> {
    let st = s.db.read();
    let (_, free) = host_free_memory(s, &st);
    let needed = cfg.memory + s.agent.memory_overhead(cfg.memory);
    if needed > free {
        return Err(errors::host_not_enough_free_memory(
            needed.to_string(),
            free.to_string(),
        ));
    }
    Ok(())
}

pub(crate) fn check_host(s: &Server, h: &str) -> Result<(), ApiError> {
    let st = s.db.read();
    if !st.exists(class::HOST, h) {
        return Err(ApiError::handle_invalid("host", h));
    }
    if h != s.host_ref {
        return Err(errors::host_offline(h));
    }
    if !flag(&st, field::host::ENABLED, h) {
        return Err(errors::host_disabled(h));
    }
    Ok(())
}

pub(crate) async fn vm_assert_can_boot_here(s: Arc<Server>, p: Vec<Value>) -> ApiResult {
    let mut it = p.into_iter();
    let vm = it.next().map(|v| v.db_string()).unwrap_or_default();
    let host = it.next().map(|v| v.db_string()).unwrap_or_default();
    if !s.db.read().exists(class::VM, &vm) {
        return Err(ApiError::handle_invalid("VM", &vm));
    }
    check_host(&s, &host)?;
    let cfg = build_config(&s, &vm)?;
    check_memory(&s, &cfg)?;
    void()
}
