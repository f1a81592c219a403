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
use crate::ops::vm::power;
use crate::ops::vm::suspend;
use corral_model::ApiError;
use corral_model::args::vm;
use corral_model::enums::VmOperations as Op;
use corral_model::refs::{Ref, classes};
use std::sync::Arc;

/// Marks `op` on the VM, then reaches the host its domain lives on.
fn on_vm(
    s: &Server,
    c: &Ctx,
    vm: &Ref<classes::VM>,
    op: Op,
) -> Result<(Mark, HostHandle), ApiError> {
    // Marked first: the VM cannot move or stop while the route is chosen.
    let mark = mark_vm(s, c, vm.as_str(), op)?;
    Ok((mark, domain_host(s, vm.as_str())?))
}

/// The host the VM's domain lives on (this host for a VM without one).
fn domain_host(s: &Server, vm: &str) -> Result<HostHandle, ApiError> {
    let on = live_on(&s.db.read(), vm);
    match route(&s.host_ref, on.as_deref()) {
        Route::Here => Ok(s.local()),
        Route::Host(h) => s.host(&h),
    }
}

/// The host a halted or suspended VM starts on: the one asked for, else
/// placement's choice (in a pool of one, this host).
fn start_host(s: &Server, asked: Option<&Ref<classes::Host>>) -> Result<HostHandle, ApiError> {
    match asked {
        Some(h) => check_host(s, h.as_str()),
        None => Ok(s.local()),
    }
}

/// Starts a halted VM, or resumes a suspended one (`resume`), on the host
/// asked for or chosen.
async fn bring_up(
    s: Arc<Server>,
    c: Ctx,
    vm: Ref<classes::VM>,
    host: Option<Ref<classes::Host>>,
    paused: bool,
    resume: bool,
) -> ApiResult {
    let op = match (resume, host.is_some()) {
        (false, false) => Op::Start,
        (false, true) => Op::StartOn,
        (true, false) => Op::Resume,
        (true, true) => Op::ResumeOn,
    };
    let _mark = mark_vm(&s, &c, vm.as_str(), op)?;
    let h = start_host(&s, host.as_ref())?;
    if resume {
        suspend::resume(Arc::clone(&s), &h, vm.as_str(), paused).await?;
    } else {
        power::start(&s, &h, vm.as_str(), paused).await?;
    }
    void()
}

pub(crate) async fn start(s: Arc<Server>, c: Ctx, a: vm::Start) -> ApiResult {
    bring_up(s, c, a.vm, None, a.start_paused, false).await
}

pub(crate) async fn start_on(s: Arc<Server>, c: Ctx, a: vm::StartOn) -> ApiResult {
    bring_up(s, c, a.vm, Some(a.host), a.start_paused, false).await
}

pub(crate) async fn resume(s: Arc<Server>, c: Ctx, a: vm::Resume) -> ApiResult {
    bring_up(s, c, a.vm, None, a.start_paused, true).await
}

pub(crate) async fn resume_on(s: Arc<Server>, c: Ctx, a: vm::ResumeOn) -> ApiResult {
    bring_up(s, c, a.vm, Some(a.host), a.start_paused, true).await
}

pub(crate) async fn clean_shutdown(s: Arc<Server>, c: Ctx, a: vm::CleanShutdown) -> ApiResult {
    let (_mark, h) = on_vm(&s, &c, &a.vm, Op::CleanShutdown)?;
    power::clean_shutdown(&s, &c, &h, a.vm.as_str()).await?;
    void()
}

pub(crate) async fn shutdown(s: Arc<Server>, c: Ctx, a: vm::Shutdown) -> ApiResult {
    let (_mark, h) = on_vm(&s, &c, &a.vm, Op::Shutdown)?;
    power::shutdown(&s, &c, &h, a.vm.as_str()).await?;
    void()
}

pub(crate) async fn hard_shutdown(s: Arc<Server>, c: Ctx, a: vm::HardShutdown) -> ApiResult {
    let (_mark, h) = on_vm(&s, &c, &a.vm, Op::HardShutdown)?;
    power::hard_shutdown(&s, &h, a.vm.as_str()).await?;
    void()
}

pub(crate) async fn clean_reboot(s: Arc<Server>, c: Ctx, a: vm::CleanReboot) -> ApiResult {
    let (_mark, h) = on_vm(&s, &c, &a.vm, Op::CleanReboot)?;
    power::clean_reboot(&s, &c, &h, a.vm.as_str()).await?;
    void()
}

pub(crate) async fn hard_reboot(s: Arc<Server>, c: Ctx, a: vm::HardReboot) -> ApiResult {
    let (_mark, h) = on_vm(&s, &c, &a.vm, Op::HardReboot)?;
    power::hard_reboot(&s, &h, a.vm.as_str()).await?;
    void()
}

async fn pause_vm(s: Arc<Server>, c: Ctx, vm: Ref<classes::VM>, pause: bool) -> ApiResult {
    let op = if pause { Op::Pause } else { Op::Unpause };
    let (_mark, h) = on_vm(&s, &c, &vm, op)?;
    power::pause(&s, &h, vm.as_str(), pause).await?;
    void()
}

pub(crate) async fn pause(s: Arc<Server>, c: Ctx, a: vm::Pause) -> ApiResult {
    pause_vm(s, c, a.vm, true).await
}

pub(crate) async fn unpause(s: Arc<Server>, c: Ctx, a: vm::Unpause) -> ApiResult {
    pause_vm(s, c, a.vm, false).await
}

pub(crate) async fn suspend(s: Arc<Server>, c: Ctx, a: vm::Suspend) -> ApiResult {
    let (_mark, h) = on_vm(&s, &c, &a.vm, Op::Suspend)?;
    suspend::suspend(Arc::clone(&s), &h, a.vm.as_str()).await?;
    void()
}

/// The one VM call that does not need its host: resetting the power state
/// of a VM whose host is gone is what it is for.
pub(crate) async fn power_state_reset(s: Arc<Server>, c: Ctx, a: vm::PowerStateReset) -> ApiResult {
    let vm = a.vm.as_str();
    let _mark = mark_vm(&s, &c, vm, Op::PowerStateReset)?;
    let h = domain_host(&s, vm).ok();
    power::power_state_reset(&s, h.as_ref(), vm).await?;
    void()
}
