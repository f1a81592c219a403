//! VM.start, shutdown, reboot, pause and power_state_reset.

use crate::context::Server;
use crate::core::call::{ApiResult, Ctx, void};
use crate::core::driver_errors;
use crate::ops::query::{power, strmap, vm_uuid};
use crate::ops::vm::config::build_config;
use crate::ops::vm::lifecycle::VmOp;
use crate::ops::vm::placement::{check_host, check_memory};
use crate::ops::vm::state::{
    alert, drop_suspend_image, record_running, record_stopped, set_paused,
};
use corral_agent::{RunState, VmConfig, VmEvent};
use corral_model::enums::{VmOperations, VmPowerState};
use corral_model::schema::field;
use corral_model::{ApiError, Value, errors};
use std::sync::Arc;
use std::time::Duration;

pub(crate) fn params(p: Vec<Value>) -> (String, Vec<Value>) {
    let mut it = p.into_iter();
    let vm = it.next().map(|v| v.db_string()).unwrap_or_default();
    (vm, it.collect())
}

/// `(vm, [host,] start_paused, force)` of start/start_on/resume/resume_on.
pub(crate) fn start_params(p: Vec<Value>, with_host: bool) -> (String, Option<String>, bool) {
    let (vm, rest) = params(p);
    let host = with_host.then(|| rest.first().map(|v| v.db_string()).unwrap_or_default());
    let paused = rest
        .get(usize::from(with_host))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    (vm, host, paused)
}

/// Builds the configuration, checks memory and launches.
pub(crate) async fn launch(
    s: &Arc<Server>,
    vm: &str,
    paused: bool,
    incoming: Option<std::path::PathBuf>,
) -> Result<VmConfig, ApiError> {
    let cfg = build_config(s, vm)?;
    check_memory(s, &cfg)?;
    let domid = s
        .agent
        .start(cfg.clone(), paused, incoming)
        .await
        .map_err(|e| match e {
            corral_agent::AgentError::StartFailed(m) => errors::bootloader_failed(vm, m.as_str()),
            other => driver_errors::agent(&vm, other),
        })?;
    if let Err(e) = record_running(s, vm, paused, domid, &cfg) {
        // Undo: the database could not say so, so nothing may run.
        let _ = s.agent.destroy(&cfg.uuid).await;
        return Err(e);
    }
    Ok(cfg)
}

pub(crate) async fn vm_start(s: Arc<Server>, c: Ctx, p: Vec<Value>, with_host: bool) -> ApiResult {
    let (vm, host, paused) = start_params(p, with_host);
    let op = if with_host {
        VmOperations::StartOn
    } else {
        VmOperations::Start
    };
    let _op = VmOp::begin(&s, &c, &vm, op)?;
    if let Some(h) = host {
        check_host(&s, &h)?;
    }
    launch(&s, &vm, paused, None).await?;
    alert(&s, &vm, "VM_STARTED", 5, "VM started");
    void()
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
    uuid: &str,
    mut rx: tokio::sync::broadcast::Receiver<(String, VmEvent)>,
    timeout: Duration,
    task: Option<&str>,
) -> Result<bool, ApiError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut next_press = tokio::time::Instant::now() + POWER_BUTTON_REPEAT;
    loop {
        if matches!(
            s.agent.state(uuid).await,
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
                let _ = s.agent.powerdown(uuid).await;
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
    vm: &str,
    timeout: Duration,
    task: Option<&str>,
) -> Result<bool, ApiError> {
    let uuid = vm_uuid(&s.db.read(), vm);
    s.expect_shutdown(&uuid, true);
    let rx = s.agent.events();
    let r = async {
        s.agent
            .powerdown(&uuid)
            .await
            .map_err(|e| driver_errors::agent(&vm, e))?;
        wait_guest_shutdown(s, &uuid, rx, timeout, task).await
    }
    .await;
    if !matches!(r, Ok(true)) {
        s.expect_shutdown(&uuid, false);
    }
    r
}

pub(crate) async fn halt(s: &Arc<Server>, vm: &str) -> Result<(), ApiError> {
    let uuid = vm_uuid(&s.db.read(), vm);
    s.agent
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

pub(crate) async fn vm_clean_shutdown(s: Arc<Server>, c: Ctx, p: Vec<Value>) -> ApiResult {
    let (vm, _) = params(p);
    let _op = VmOp::begin(&s, &c, &vm, VmOperations::CleanShutdown)?;
    let t = clean_timeout(&s, &vm);
    if !clean_stop(&s, &vm, t, c.task.as_deref()).await? {
        return Err(errors::vm_shutdown_timeout(
            vm.clone(),
            t.as_secs().to_string(),
        ));
    }
    if power(&s.db.read(), &vm) == VmPowerState::Halted {
        // A hard shutdown ran meanwhile and did the rest.
        return void();
    }
    halt(&s, &vm).await?;
    alert(&s, &vm, "VM_SHUTDOWN", 5, "VM shut down");
    void()
}

pub(crate) async fn vm_shutdown(s: Arc<Server>, c: Ctx, p: Vec<Value>) -> ApiResult {
    let (vm, _) = params(p);
    let _op = VmOp::begin(&s, &c, &vm, VmOperations::Shutdown)?;
    let state = power(&s.db.read(), &vm);
    if state == VmPowerState::Suspended {
        drop_suspend_image(&s, &vm).await;
        record_stopped(&s, &vm, VmPowerState::Halted, None)?;
        return void();
    }
    if state == VmPowerState::Running {
        let t = clean_timeout(&s, &vm);
        match clean_stop(&s, &vm, t, c.task.as_deref()).await {
            Ok(true) => {}
            Err(e) if e.code == errors::TASK_CANCELLED => return Err(e),
            _ => tracing::info!(vm = %vm, "clean shutdown timed out; forcing off"),
        }
    }
    halt(&s, &vm).await?;
    void()
}

pub(crate) async fn vm_hard_shutdown(s: Arc<Server>, c: Ctx, p: Vec<Value>) -> ApiResult {
    let (vm, _) = params(p);
    let _op = VmOp::begin(&s, &c, &vm, VmOperations::HardShutdown)?;
    if power(&s.db.read(), &vm) == VmPowerState::Suspended {
        drop_suspend_image(&s, &vm).await;
        record_stopped(&s, &vm, VmPowerState::Halted, None)?;
        return void();
    }
    halt(&s, &vm).await?;
    void()
}

pub(crate) async fn vm_clean_reboot(s: Arc<Server>, c: Ctx, p: Vec<Value>) -> ApiResult {
    let (vm, _) = params(p);
    let _op = VmOp::begin(&s, &c, &vm, VmOperations::CleanReboot)?;
    let t = clean_timeout(&s, &vm);
    if !clean_stop(&s, &vm, t, c.task.as_deref()).await? {
        return Err(errors::vm_shutdown_timeout(
            vm.clone(),
            t.as_secs().to_string(),
        ));
    }
    let now = power(&s.db.read(), &vm);
    if now == VmPowerState::Halted {
        // Forced off meanwhile (a concurrent hard shutdown): no reboot.
        return Err(errors::vm_bad_power_state(vm.as_str(), "running", "halted"));
    }
    let uuid = vm_uuid(&s.db.read(), &vm);
    let r = s
        .agent
        .reset(&uuid)
        .await
        .map_err(|e| driver_errors::agent(&vm, e));
    s.expect_shutdown(&uuid, false);
    r?;
    set_paused(&s, &vm, false)?;
    alert(&s, &vm, "VM_REBOOTED", 5, "VM rebooted");
    void()
}

pub(crate) async fn vm_hard_reboot(s: Arc<Server>, c: Ctx, p: Vec<Value>) -> ApiResult {
    let (vm, _) = params(p);
    let _op = VmOp::begin(&s, &c, &vm, VmOperations::HardReboot)?;
    let uuid = vm_uuid(&s.db.read(), &vm);
    s.agent
        .reset(&uuid)
        .await
        .map_err(|e| driver_errors::agent(&vm, e))?;
    set_paused(&s, &vm, false)?;
    void()
}

pub(crate) async fn vm_pause(s: Arc<Server>, c: Ctx, p: Vec<Value>, pause: bool) -> ApiResult {
    let (vm, _) = params(p);
    let _op = VmOp::begin(
        &s,
        &c,
        &vm,
        if pause {
            VmOperations::Pause
        } else {
            VmOperations::Unpause
        },
    )?;
    let uuid = vm_uuid(&s.db.read(), &vm);
    if pause {
        s.agent
            .pause(&uuid)
            .await
            .map_err(|e| driver_errors::agent(&vm, e))?;
    } else {
        s.agent
            .unpause(&uuid)
            .await
            .map_err(|e| driver_errors::agent(&vm, e))?;
    }
    set_paused(&s, &vm, pause)?;
    void()
}

pub(crate) async fn vm_power_state_reset(s: Arc<Server>, c: Ctx, p: Vec<Value>) -> ApiResult {
    let (vm, _) = params(p);
    let _op = VmOp::begin(&s, &c, &vm, VmOperations::PowerStateReset)?;
    let uuid = vm_uuid(&s.db.read(), &vm);
    // Only a VM this host no longer runs may be reset (XAPI refuses a
    // running domain too); never leave a QEMU the database forgot.
    if matches!(
        s.agent.state(&uuid).await,
        Ok(RunState::Running | RunState::Paused)
    ) {
        return Err(ApiError::operation_not_allowed(
            "the VM is still running on this host",
        ));
    }
    let _ = s.agent.destroy(&uuid).await;
    record_stopped(&s, &vm, VmPowerState::Halted, None)?;
    void()
}
