//! At start: re-attach running VMs and undo interrupted operations.

use crate::context::Server;
use crate::core::driver_errors;
use crate::core::records::db;
use crate::ops::query::{flag, live_here, power, strmap, vbds_of, vm_uuid};
use crate::ops::vm::clone::own_disks;
use crate::ops::vm::lifecycle::{BEING_MADE, refresh_allowed};
use crate::ops::vm::monitor::{on_event, refresh_metrics};
use crate::ops::vm::state::{alert, drop_unused_suspend_images, record_stopped, set_paused};
use crate::ops::vm::{Ctx, int, vm_start};
use corral_agent::{RunState, VmEvent};
use corral_model::enums::VmPowerState;
use corral_model::schema::{class, field};
use corral_model::{ApiError, Value};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// VMs that a VM.clone/VM.copy with disks was still making when corrald
/// died: removed with the disks made for them.
pub(crate) async fn undo_interrupted_copies(s: &Arc<Server>) {
    let half: Vec<String> = {
        let st = s.db.read();
        st.refs(class::VM)
            .filter(|vm| strmap(st.get(field::vm::OTHER_CONFIG, vm)).contains_key(BEING_MADE))
            .cloned()
            .collect()
    };
    for vm in half {
        tracing::warn!(vm = %vm, "removing a VM whose clone or copy was interrupted");
        let disks = own_disks(&s.db.read(), &vm);
        let _ = db(s.db.write(|t| {
            for vbd in vbds_of(t.state(), &vm) {
                t.delete(class::VBD, &vbd)?;
            }
            t.delete(class::VM, &vm)
        }));
        for v in disks {
            let _ = crate::ops::vdi::vdi_destroy(Arc::clone(s), vec![Value::str(&v)]).await;
        }
    }
}

/// Re-attaches to the VMs this host runs and reconciles power states, then
/// follows the agent's events and refreshes metrics.
pub async fn startup(s: &Arc<Server>) -> Result<(), ApiError> {
    let found: HashMap<String, RunState> = s
        .agent
        .reattach()
        .await
        .map_err(driver_errors::agent_on_host)?
        .into_iter()
        .collect();
    // Operations in flight died with the old corrald (tasks are volatile):
    // note what each VM was doing, then clear them all.
    let interrupted: HashMap<String, Vec<String>> = db(s.db.write(|t| {
        let mut out = HashMap::new();
        let vms: Vec<String> = t.state().refs(class::VM).cloned().collect();
        for vm in vms {
            let ops: Vec<String> = t
                .state()
                .get(field::vm::CURRENT_OPERATIONS, &vm)
                .and_then(|v| {
                    v.as_struct()
                        .map(|m| m.iter().map(|(_, o)| o.db_string()).collect())
                })
                .unwrap_or_default();
            if !ops.is_empty() {
                t.set(field::vm::CURRENT_OPERATIONS, &vm, Value::Struct(vec![]))?;
                out.insert(vm, ops);
            }
        }
        Ok::<_, ApiError>(out)
    }))?;
    let was = |vm: &str, op: &str| {
        interrupted
            .get(vm)
            .is_some_and(|o| o.iter().any(|x| x == op))
    };
    undo_interrupted_copies(s).await;
    let mine: Vec<(String, String, VmPowerState)> = {
        let st = s.db.read();
        st.refs(class::VM)
            .filter(|vm| live_here(s, &st, vm))
            .map(|vm| (vm.clone(), vm_uuid(&st, vm), power(&st, vm)))
            .collect()
    };
    for (vm, uuid, p) in &mine {
        if was(vm, "suspend") {
            // An unfinished suspend is undone: the guest runs on (it was
            // paused for the save) and the half-written image goes.
            if found.get(uuid) == Some(&RunState::Paused) && *p == VmPowerState::Running {
                let _ = s.agent.unpause(uuid).await;
                drop_unused_suspend_images(s, vm).await;
                continue;
            }
            drop_unused_suspend_images(s, vm).await;
        }
        match found.get(uuid) {
            Some(RunState::Running) if *p != VmPowerState::Running => {
                let _ = set_paused(s, vm, false);
            }
            Some(RunState::Paused) if *p != VmPowerState::Paused => {
                let _ = set_paused(s, vm, true);
            }
            Some(RunState::Running | RunState::Paused) => {}
            Some(RunState::ShutDown) => on_event(s, uuid, VmEvent::GuestShutdown).await,
            Some(RunState::Crashed) => on_event(s, uuid, VmEvent::GuestCrash).await,
            Some(RunState::Gone) | None
                if ["clean_shutdown", "hard_shutdown", "shutdown"]
                    .iter()
                    .any(|o| was(vm, o)) =>
            {
                // A shutdown that finished while corrald was down.
                alert(s, vm, "VM_SHUTDOWN", 5, "VM shut down");
                let _ = record_stopped(s, vm, VmPowerState::Halted, None);
            }
            Some(RunState::Gone) | None => {
                alert(
                    s,
                    vm,
                    "VM_CRASHED",
                    2,
                    "The VM's QEMU process was gone when the toolstack started; the VM is now halted.",
                );
                let _ = record_stopped(s, vm, VmPowerState::Halted, None);
            }
        }
    }
    // QEMUs the database does not know as running here are not ours to keep.
    for (uuid, st) in &found {
        if *st != RunState::Gone && !mine.iter().any(|(_, u, _)| u == uuid) {
            tracing::warn!(vm = %uuid, "stopping a QEMU the database does not run here");
            let _ = s.agent.destroy(uuid).await;
        }
    }
    // Every VM's allowed operations follow the rules of this build.
    let _ = db(s.db.write(|t| {
        let vms: Vec<String> = t.state().refs(class::VM).cloned().collect();
        for vm in vms {
            refresh_allowed(t, &vm)?;
        }
        Ok::<(), ApiError>(())
    }));
    let mut rx = s.agent.events();
    let srv = Arc::clone(s);
    tokio::spawn(async move {
        loop {
            match rx.recv().await {
                Ok((uuid, ev)) => {
                    let srv = Arc::clone(&srv);
                    tokio::spawn(async move { on_event(&srv, &uuid, ev).await });
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(_) => break,
            }
        }
    });
    let srv = Arc::clone(s);
    tokio::spawn(async move { boot_policy(&srv).await });
    let srv = Arc::clone(s);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            refresh_metrics(&srv).await;
        }
    });
    Ok(())
}

/// At the first corrald start after a host boot, `vm-boot-policy=start`
/// starts the VMs with `other_config:auto_poweron=true` in `order`, waiting
/// `start_delay` after each; the default `ignore` resumes nothing.
pub async fn boot_policy(s: &Arc<Server>) {
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let marker = s.state_dir.join("last-boot-id");
    let first_start = std::fs::read_to_string(&marker)
        .map(|b| b != boot_id)
        .unwrap_or(true);
    let _ = std::fs::write(&marker, &boot_id);
    let oc = strmap(s.db.read().get(field::host::OTHER_CONFIG, &s.host_ref));
    if !first_start || oc.get("vm-boot-policy").map(String::as_str) != Some("start") {
        return;
    }
    let mut vms: Vec<(i64, i64, String)> = {
        let st = s.db.read();
        st.refs(class::VM)
            .filter(|vm| {
                power(&st, vm) == VmPowerState::Halted
                    && !flag(&st, field::vm::IS_A_TEMPLATE, vm)
                    && strmap(st.get(field::vm::OTHER_CONFIG, vm))
                        .get("auto_poweron")
                        .map(String::as_str)
                        == Some("true")
            })
            .map(|vm| {
                (
                    int(&st, field::vm::ORDER, vm),
                    int(&st, field::vm::START_DELAY, vm),
                    vm.clone(),
                )
            })
            .collect()
    };
    vms.sort();
    let ctx = Ctx {
        session: String::new(),
        role: corral_model::schema::Role::PoolAdmin,
        user: "root".into(),
        user_ref: String::new(),
        task: None,
    };
    for (_, delay, vm) in vms {
        if let Err(e) = vm_start(
            Arc::clone(s),
            ctx.clone(),
            vec![Value::str(&vm), Value::Bool(false), Value::Bool(false)],
            false,
        )
        .await
        {
            tracing::warn!(vm = %vm, error = %e, "auto power-on failed");
        }
        tokio::time::sleep(Duration::from_secs(delay.max(0) as u64)).await;
    }
}
