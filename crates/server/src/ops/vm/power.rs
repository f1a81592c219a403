//! VM.start, shutdown, reboot, pause and power_state_reset.

use crate::context::Server;
use crate::context::hosts::HostHandle;
use crate::core::call::Ctx;
use crate::core::driver_errors;
use crate::ops::query::{power, strmap, vm_uuid};
use crate::ops::vm::config::build_config;
use crate::ops::vm::placement::check_memory;
use crate::ops::vm::state::{
    alert, drop_suspend_image, record_running, record_stopped, set_paused,
};
use corral_agent::{RunState, VmConfig, VmEvent};
use corral_model::enums::VmPowerState;
use corral_model::schema::field;
use corral_model::{ApiError, errors};
use std::sync::Arc;
use std::time::Duration;

/// Builds the configuration, checks memory and launches.
pub(crate) async fn launch(
    s: &Arc<Server>,
    h: &HostHandle,
    vm: &str,
    paused: bool,
    incoming: Option<std::path::PathBuf>,
) -> Result<VmConfig, ApiError> {
    let cfg = build_config(s, vm)?;
    check_memory(s, h, &cfg)?;
    // The bridges the VM's NICs go on, on the host it starts on.
    let bridges = crate::ops::vif::bridges_of(&s.db.read(), vm);
    for (bridge, mtu) in bridges {
        h.net
            .ensure_bridge(&bridge, mtu)
            .await
            .map_err(|e| driver_errors::network(&bridge, e))?;
    }
    // Filters first: the taps are filtered from their first frame.
    crate::ops::vif::port::apply_vm(s, h, vm).await?;
    let domid = h
        .agent
        .start(cfg.clone(), paused, incoming)
        .await
        .map_err(|e| match e {
            corral_agent::AgentError::StartFailed(m) => errors::bootloader_failed(vm, m.as_str()),
            other => driver_errors::agent(&vm, other),
        })?;
    if let Err(e) = record_running(s, &h.host, vm, paused, domid, &cfg) {
        // Undo: the database could not say so, so nothing may run.
        let _ = h.agent.destroy(&cfg.uuid).await;
        return Err(e);
    }
    Ok(cfg)
}

/// Starts a halted VM on `h` (the host placement or `start_on` chose).
pub(crate) async fn start(
    s: &Arc<Server>,
    h: &HostHandle,
    vm: &str,
    paused: bool,
) -> Result<(), ApiError> {
    launch(s, h, vm, paused, None).await?;
    alert(s, vm, "VM_STARTED", 5, "VM started");
    Ok(())
}

/// How often the power button is pressed again while a clean shutdown
/// waits: a guest still booting when asked (no ACPI daemon yet) misses the
/// first press.
pub(crate) const POWER_BUTTON_REPEAT: Duration = Duration::from_secs(10);

/// How often a waiting operation looks for a cancel request (and for a
/// QEMU that a concurrent hard shutdown stopped).
pub(crate) const CANCEL_POLL: Duration = Duration::from_secs(1);

/// Waits for the guest to power itself off after the power button; fails
/// with `TASK_CANCELLED` when `task` is cancelled meanwhile.
pub(crate) async fn wait_guest_shutdown(
    s: &Arc<Server>,
    h: &HostHandle,
    uuid: &str,
    mut rx: tokio::sync::broadcast::Receiver<(String, VmEvent)>,
    timeout: Duration,
    task: Option<&str>,
) -> Result<bool, ApiError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut next_press = tokio::time::Instant::now() + POWER_BUTTON_REPEAT;
    loop {
        if matches!(
            h.agent.state(uuid).await,
            Ok(RunState::ShutDown | RunState::Gone)
        ) {
            return Ok(true);
        }
        if let Some(t) = task.filter(|t| s.task_cancel_requested(t)) {
            return Err(errors::task_cancelled(t));
        }
        let now = tokio::time::Instant::now();
        match tokio::time::timeout_at(deadline.min(next_press).min(now + CANCEL_POLL), rx.recv())
            .await
        {
            Err(_) if tokio::time::Instant::now() >= deadline => return Ok(false),
            Err(_) if tokio::time::Instant::now() >= next_press => {
                let _ = h.agent.powerdown(uuid).await;
                next_press += POWER_BUTTON_REPEAT;
            }
            Err(_) => {}
            Ok(Ok((u, VmEvent::GuestShutdown | VmEvent::Died(_)))) if u == uuid => return Ok(true),
            Ok(Err(tokio::sync::broadcast::error::RecvError::Closed)) => return Ok(false),
            Ok(_) => {}
        }
    }
}

/// Power button, wait up to `timeout`; true when the guest went down.
pub(crate) async fn clean_stop(
    s: &Arc<Server>,
    h: &HostHandle,
    vm: &str,
    timeout: Duration,
    task: Option<&str>,
) -> Result<bool, ApiError> {
    let uuid = vm_uuid(&s.db.read(), vm);
    s.expect_shutdown(&uuid, true);
    let rx = h.agent.events();
    let r = async {
        h.agent
            .powerdown(&uuid)
            .await
            .map_err(|e| driver_errors::agent(vm, e))?;
        wait_guest_shutdown(s, h, &uuid, rx, timeout, task).await
    }
    .await;
    if !matches!(r, Ok(true)) {
        s.expect_shutdown(&uuid, false);
    }
    r
}

pub(crate) async fn halt(s: &Arc<Server>, h: &HostHandle, vm: &str) -> Result<(), ApiError> {
    let uuid = vm_uuid(&s.db.read(), vm);
    h.agent
        .destroy(&uuid)
        .await
        .map_err(|e| driver_errors::agent(&vm, e))?;
    s.expect_shutdown(&uuid, false);
    record_stopped(s, vm, VmPowerState::Halted, None)
}

pub(crate) fn clean_timeout(s: &Server, vm: &str) -> Duration {
    let oc = strmap(s.db.read().get(field::vm::OTHER_CONFIG, vm));
    Duration::from_secs(
        oc.get("clean_shutdown_timeout")
            .and_then(|v| v.parse().ok())
            .unwrap_or(s.config.clean_shutdown_timeout.as_secs()),
    )
}

/// The power button, and the guest must go down within its timeout.
async fn clean_stop_in_time(
    s: &Arc<Server>,
    c: &Ctx,
    h: &HostHandle,
    vm: &str,
) -> Result<(), ApiError> {
    let t = clean_timeout(s, vm);
    if !clean_stop(s, h, vm, t, c.task.as_deref()).await? {
        return Err(errors::vm_shutdown_timeout(vm, t.as_secs().to_string()));
    }
    Ok(())
}

/// A suspended VM is halted by dropping its image; true when it was one.
async fn halt_if_suspended(s: &Arc<Server>, vm: &str) -> Result<bool, ApiError> {
    if power(&s.db.read(), vm) != VmPowerState::Suspended {
        return Ok(false);
    }
    drop_suspend_image(s, vm).await;
    record_stopped(s, vm, VmPowerState::Halted, None)?;
    Ok(true)
}

pub(crate) async fn clean_shutdown(
    s: &Arc<Server>,
    c: &Ctx,
    h: &HostHandle,
    vm: &str,
) -> Result<(), ApiError> {
    clean_stop_in_time(s, c, h, vm).await?;
    if power(&s.db.read(), vm) == VmPowerState::Halted {
        // A hard shutdown ran meanwhile and did the rest.
        return Ok(());
    }
    halt(s, h, vm).await?;
    alert(s, vm, "VM_SHUTDOWN", 5, "VM shut down");
    Ok(())
}

/// Clean if the guest cooperates in time, else forced (and a suspended
/// VM's image is dropped).
pub(crate) async fn shutdown(
    s: &Arc<Server>,
    c: &Ctx,
    h: &HostHandle,
    vm: &str,
) -> Result<(), ApiError> {
    if halt_if_suspended(s, vm).await? {
        return Ok(());
    }
    if power(&s.db.read(), vm) == VmPowerState::Running {
        let t = clean_timeout(s, vm);
        match clean_stop(s, h, vm, t, c.task.as_deref()).await {
            Ok(true) => {}
            Err(e) if e.code == errors::TASK_CANCELLED => return Err(e),
            _ => tracing::info!(vm = %vm, "clean shutdown timed out; forcing off"),
        }
    }
    halt(s, h, vm).await
}

pub(crate) async fn hard_shutdown(
    s: &Arc<Server>,
    h: &HostHandle,
    vm: &str,
) -> Result<(), ApiError> {
    if halt_if_suspended(s, vm).await? {
        return Ok(());
    }
    halt(s, h, vm).await
}

pub(crate) async fn clean_reboot(
    s: &Arc<Server>,
    c: &Ctx,
    h: &HostHandle,
    vm: &str,
) -> Result<(), ApiError> {
    clean_stop_in_time(s, c, h, vm).await?;
    if power(&s.db.read(), vm) == VmPowerState::Halted {
        // Forced off meanwhile (a concurrent hard shutdown): no reboot.
        return Err(errors::vm_bad_power_state(vm, "running", "halted"));
    }
    let uuid = vm_uuid(&s.db.read(), vm);
    let r = h
        .agent
        .reset(&uuid)
        .await
        .map_err(|e| driver_errors::agent(vm, e));
    s.expect_shutdown(&uuid, false);
    r?;
    set_paused(s, vm, false)?;
    alert(s, vm, "VM_REBOOTED", 5, "VM rebooted");
    Ok(())
}

pub(crate) async fn hard_reboot(s: &Arc<Server>, h: &HostHandle, vm: &str) -> Result<(), ApiError> {
    let uuid = vm_uuid(&s.db.read(), vm);
    h.agent
        .reset(&uuid)
        .await
        .map_err(|e| driver_errors::agent(vm, e))?;
    set_paused(s, vm, false)
}

pub(crate) async fn pause(
    s: &Arc<Server>,
    h: &HostHandle,
    vm: &str,
    pause: bool,
) -> Result<(), ApiError> {
    let uuid = vm_uuid(&s.db.read(), vm);
    let r = if pause {
        h.agent.pause(&uuid).await
    } else {
        h.agent.unpause(&uuid).await
    };
    r.map_err(|e| driver_errors::agent(vm, e))?;
    set_paused(s, vm, pause)
}

/// Only a VM its host no longer runs may be reset (XAPI refuses a running
/// domain too); never leave a QEMU the database forgot. `h` is none when
/// the VM's host cannot be reached (a dead host's VMs are reset so they
/// can start elsewhere).
pub(crate) async fn power_state_reset(
    s: &Arc<Server>,
    h: Option<&HostHandle>,
    vm: &str,
) -> Result<(), ApiError> {
    let uuid = vm_uuid(&s.db.read(), vm);
    if let Some(h) = h {
        if matches!(
            h.agent.state(&uuid).await,
            Ok(RunState::Running | RunState::Paused)
        ) {
            return Err(ApiError::operation_not_allowed(
                "the VM is still running on its host",
            ));
        }
        let _ = h.agent.destroy(&uuid).await;
    }
    record_stopped(s, vm, VmPowerState::Halted, None)
}
