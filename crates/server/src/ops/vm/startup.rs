//! At start: re-attach running VMs and undo interrupted operations.

use crate::context::Server;
use crate::core::call::Ctx;
use crate::core::driver_errors;
use crate::core::marks::clear_dead;
use crate::core::records::db;
use crate::ops::query::int;
use crate::ops::query::{flag, live_at, power, strmap, vbds_of, vm_uuid};
use crate::ops::vm::clone::own_disks;
use crate::ops::vm::lifecycle::{BEING_MADE, mark_vm, refresh_allowed};
use crate::ops::vm::monitor::{on_event, refresh_metrics, watch_host};
use crate::ops::vm::power::start;
use crate::ops::vm::state::{alert, drop_unused_suspend_images, record_stopped, set_paused};
use corral_agent::{RunState, VmEvent};
use corral_model::ApiError;
use corral_model::enums::{VmOperations, VmPowerState};
use corral_model::schema::{class, field};
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
            let _ = crate::ops::vdi::vdi_destroy(Arc::clone(s), &v).await;
        }
    }
}

/// Re-attaches to the VMs this host runs and reconciles power states, then
/// follows the agent's events and refreshes metrics.
pub async fn startup(s: &Arc<Server>) -> Result<(), ApiError> {
    let here = s.local();
    let found: HashMap<String, RunState> = here
        .agent
        .reattach()
        .await
        .map_err(driver_errors::agent_on_host)?
        .into_iter()
        .collect();
    // Operations this host had in flight died with its old process: note
    // what each VM was doing, then clear those marks (another host's stay).
    let is_master = s.is_master();
    let interrupted: HashMap<String, Vec<String>> = db(s.db.write(|t| {
        let mut out = HashMap::new();
        let vms: Vec<String> = t.state().refs(class::VM).cloned().collect();
        for vm in vms {
            let ops = clear_dead(
                t,
                field::vm::CURRENT_OPERATIONS,
                &vm,
                &s.host_ref,
                is_master,
            )?;
            if !ops.is_empty() {
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
            .filter(|vm| live_at(&st, &s.host_ref, vm))
            .map(|vm| (vm.clone(), vm_uuid(&st, vm), power(&st, vm)))
            .collect()
    };
    for (vm, uuid, p) in &mine {
        if was(vm, "suspend") {
            // An unfinished suspend is undone: the guest runs on (it was
            // paused for the save) and the half-written image goes.
            if found.get(uuid) == Some(&RunState::Paused) && *p == VmPowerState::Running {
                let _ = here.agent.unpause(uuid).await;
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
            Some(RunState::ShutDown) => on_event(s, &here, uuid, VmEvent::GuestShutdown).await,
            Some(RunState::Crashed) => on_event(s, &here, uuid, VmEvent::GuestCrash).await,
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
            let _ = here.agent.destroy(uuid).await;
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
    crate::ops::vif::port::reconcile(s, &here).await;
    watch_host(s, here);
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
    let here = s.local();
    for (_, delay, vm) in vms {
        let started = async {
            let _mark = mark_vm(s, &ctx, &vm, VmOperations::Start)?;
            start(s, &here, &vm, false).await
        };
        if let Err(e) = started.await {
            tracing::warn!(vm = %vm, error = %e, "auto power-on failed");
        }
        tokio::time::sleep(Duration::from_secs(delay.max(0) as u64)).await;
    }
}
