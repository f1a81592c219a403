//! VM messages that act on a host: each marks the VM for the whole call,
//! then acts through the host its domain lives on (or, to start one, the
//! host asked for or chosen).

use crate::context::Server;
use crate::context::hosts::HostHandle;
use crate::core::call::{ApiResult, Ctx, void};
use crate::core::marks::Mark;
use crate::forward::{Route, route};
use crate::ops::query::live_on;
use crate::ops::vm::lifecycle::mark_vm;
use crate::ops::vm::placement::check_host;
use crate::ops::vm::power::{self, params, start_params};
use crate::ops::vm::suspend;
use corral_model::enums::VmOperations as Op;
use corral_model::{ApiError, Value};
use std::sync::Arc;

/// Marks `op` on the VM, then reaches the host its domain lives on.
fn on_vm(s: &Server, c: &Ctx, vm: &str, op: Op) -> Result<(Mark, HostHandle), ApiError> {
    // Marked first: the VM cannot move or stop while the route is chosen.
    let mark = mark_vm(s, c, vm, op)?;
    let on = live_on(&s.db.read(), vm);
    let host = match route(&s.host_ref, on.as_deref()) {
        Route::Here => s.local(),
        Route::Host(h) => s.host(&h)?,
    };
    Ok((mark, host))
}

/// The host a halted or suspended VM starts on: the one asked for, else
/// placement's choice (in a pool of one, this host).
fn start_host(s: &Server, asked: Option<&str>) -> Result<HostHandle, ApiError> {
    match asked {
        Some(h) => check_host(s, h),
        None => Ok(s.local()),
    }
}

pub(crate) async fn start(s: Arc<Server>, c: Ctx, p: Vec<Value>, with_host: bool) -> ApiResult {
    let (vm, host, paused) = start_params(p, with_host);
    let op = if with_host { Op::StartOn } else { Op::Start };
    let _mark = mark_vm(&s, &c, &vm, op)?;
    let h = start_host(&s, host.as_deref())?;
    power::start(&s, &h, &vm, paused).await?;
    void()
}

pub(crate) async fn resume(s: Arc<Server>, c: Ctx, p: Vec<Value>, with_host: bool) -> ApiResult {
    let (vm, host, paused) = start_params(p, with_host);
    let op = if with_host { Op::ResumeOn } else { Op::Resume };
    let _mark = mark_vm(&s, &c, &vm, op)?;
    let h = start_host(&s, host.as_deref())?;
    suspend::resume(Arc::clone(&s), &h, &vm, paused).await?;
    void()
}

pub(crate) async fn clean_shutdown(s: Arc<Server>, c: Ctx, p: Vec<Value>) -> ApiResult {
    let (vm, _) = params(p);
    let (_mark, h) = on_vm(&s, &c, &vm, Op::CleanShutdown)?;
    power::clean_shutdown(&s, &c, &h, &vm).await?;
    void()
}

pub(crate) async fn shutdown(s: Arc<Server>, c: Ctx, p: Vec<Value>) -> ApiResult {
    let (vm, _) = params(p);
    let (_mark, h) = on_vm(&s, &c, &vm, Op::Shutdown)?;
    power::shutdown(&s, &c, &h, &vm).await?;
    void()
}

pub(crate) async fn hard_shutdown(s: Arc<Server>, c: Ctx, p: Vec<Value>) -> ApiResult {
    let (vm, _) = params(p);
    let (_mark, h) = on_vm(&s, &c, &vm, Op::HardShutdown)?;
    power::hard_shutdown(&s, &h, &vm).await?;
    void()
}

pub(crate) async fn clean_reboot(s: Arc<Server>, c: Ctx, p: Vec<Value>) -> ApiResult {
    let (vm, _) = params(p);
    let (_mark, h) = on_vm(&s, &c, &vm, Op::CleanReboot)?;
    power::clean_reboot(&s, &c, &h, &vm).await?;
    void()
}

pub(crate) async fn hard_reboot(s: Arc<Server>, c: Ctx, p: Vec<Value>) -> ApiResult {
    let (vm, _) = params(p);
    let (_mark, h) = on_vm(&s, &c, &vm, Op::HardReboot)?;
    power::hard_reboot(&s, &h, &vm).await?;
    void()
}

pub(crate) async fn pause(s: Arc<Server>, c: Ctx, p: Vec<Value>, pause: bool) -> ApiResult {
    let (vm, _) = params(p);
    let op = if pause { Op::Pause } else { Op::Unpause };
    let (_mark, h) = on_vm(&s, &c, &vm, op)?;
    power::pause(&s, &h, &vm, pause).await?;
    void()
}

pub(crate) async fn suspend(s: Arc<Server>, c: Ctx, p: Vec<Value>) -> ApiResult {
    let (vm, _) = params(p);
    let (_mark, h) = on_vm(&s, &c, &vm, Op::Suspend)?;
    suspend::suspend(Arc::clone(&s), &h, &vm).await?;
    void()
}

/// The one VM call that does not need its host: resetting the power state
/// of a VM whose host is gone is what it is for.
pub(crate) async fn power_state_reset(s: Arc<Server>, c: Ctx, p: Vec<Value>) -> ApiResult {
    let (vm, _) = params(p);
    let _mark = mark_vm(&s, &c, &vm, Op::PowerStateReset)?;
    let on = live_on(&s.db.read(), &vm);
    let h = match route(&s.host_ref, on.as_deref()) {
        Route::Here => Some(s.local()),
        Route::Host(h) => s.host(&h).ok(),
    };
    power::power_state_reset(&s, h.as_ref(), &vm).await?;
    void()
}
