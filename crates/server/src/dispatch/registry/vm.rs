//! The VM handlers: wire names to the operations of ops::vm.

use crate::context::{Handler, Server};
use crate::core::call::{BoxFut, Ctx, void};
use crate::core::records::db;
use crate::forward::vm as fvm;
use crate::ops::host::host_shutdown_vms;
use crate::ops::query::int;
use crate::ops::vbd::{vbd_media, vbd_plug, vbd_unplug};
use crate::ops::vm::clone::{vm_clone_or_copy, vm_destroy, vm_provision};
use crate::ops::vm::lifecycle::{refresh_allowed, vm_assert_operation_valid};
use crate::ops::vm::memory::{ints, set_memory};
use crate::ops::vm::placement::{host_free_memory, vm_assert_can_boot_here};
use crate::ops::vm::power::params;
use corral_model::Value;
use corral_model::schema::field;
use std::collections::HashMap;
use std::sync::Arc;

pub fn register(t: &mut HashMap<String, Handler>) {
    let mut a = |n: &str, f: fn(Arc<Server>, Ctx, Vec<Value>) -> BoxFut| {
        t.insert(n.to_owned(), Handler::Async(f));
    };
    a("VM.start", |s, c, p| Box::pin(fvm::start(s, c, p, false)));
    a("VM.start_on", |s, c, p| Box::pin(fvm::start(s, c, p, true)));
    a("VM.clean_shutdown", |s, c, p| {
        Box::pin(fvm::clean_shutdown(s, c, p))
    });
    a("VM.shutdown", |s, c, p| Box::pin(fvm::shutdown(s, c, p)));
    a("VM.hard_shutdown", |s, c, p| {
        Box::pin(fvm::hard_shutdown(s, c, p))
    });
    a("VM.clean_reboot", |s, c, p| {
        Box::pin(fvm::clean_reboot(s, c, p))
    });
    a("VM.hard_reboot", |s, c, p| {
        Box::pin(fvm::hard_reboot(s, c, p))
    });
    a("VM.pause", |s, c, p| Box::pin(fvm::pause(s, c, p, true)));
    a("VM.unpause", |s, c, p| Box::pin(fvm::pause(s, c, p, false)));
    a("VM.suspend", |s, c, p| Box::pin(fvm::suspend(s, c, p)));
    a("VM.resume", |s, c, p| Box::pin(fvm::resume(s, c, p, false)));
    a("VM.resume_on", |s, c, p| {
        Box::pin(fvm::resume(s, c, p, true))
    });
    a("VM.power_state_reset", |s, c, p| {
        Box::pin(fvm::power_state_reset(s, c, p))
    });
    a("VM.destroy", |s, c, p| Box::pin(vm_destroy(s, c, p)));
    a("VM.clone", |s, c, p| {
        Box::pin(vm_clone_or_copy(s, c, p, false))
    });
    a("VM.copy", |s, c, p| {
        Box::pin(vm_clone_or_copy(s, c, p, true))
    });
    a("VM.provision", |s, c, p| Box::pin(vm_provision(s, c, p)));
    a("VM.assert_operation_valid", |s, _, p| {
        Box::pin(vm_assert_operation_valid(s, p))
    });
    a("VM.assert_can_boot_here", |s, _, p| {
        Box::pin(vm_assert_can_boot_here(s, p))
    });
    a("VM.update_allowed_operations", |s, _, p| {
        Box::pin(async move {
            let (vm, _) = params(p);
            db(s.db.write(|t| refresh_allowed(t, &vm)))?;
            void()
        })
    });
    a("VM.compute_memory_overhead", |s, _, p| {
        Box::pin(async move {
            let (vm, _) = params(p);
            let m = int(&s.db.read(), field::vm::MEMORY_STATIC_MAX, &vm);
            Ok(Value::Int(s.local().agent.memory_overhead(m)))
        })
    });
    a("host.compute_free_memory", |s, _, _| {
        Box::pin(async move { Ok(Value::Int(host_free_memory(&s.local(), &s.db.read()).1)) })
    });
    a("VM.set_memory_limits", |s, _, p| {
        Box::pin(async move {
            let (vm, rest) = params(p);
            let v = ints(&rest);
            set_memory(
                &s,
                &vm,
                v.first().copied(),
                v.get(1).copied(),
                v.get(2).copied(),
                v.get(3).copied(),
            )
            .await
        })
    });
    a("VM.set_memory_static_range", |s, _, p| {
        Box::pin(async move {
            let (vm, rest) = params(p);
            let v = ints(&rest);
            set_memory(&s, &vm, v.first().copied(), v.get(1).copied(), None, None).await
        })
    });
    a("VM.set_memory_dynamic_range", |s, _, p| {
        Box::pin(async move {
            let (vm, rest) = params(p);
            let v = ints(&rest);
            set_memory(&s, &vm, None, None, v.first().copied(), v.get(1).copied()).await
        })
    });
    a("VM.set_memory", |s, _, p| {
        Box::pin(async move {
            let (vm, rest) = params(p);
            let v = ints(&rest).first().copied();
            set_memory(&s, &vm, None, v, v, v).await
        })
    });
    a("host.shutdown_vms", |s, c, p| {
        Box::pin(host_shutdown_vms(s, c, p))
    });
    a("VBD.plug", |s, c, p| Box::pin(vbd_plug(s, c, p)));
    a("VBD.unplug", |s, c, p| Box::pin(vbd_unplug(s, c, p)));
    a("VBD.unplug_force", |s, c, p| Box::pin(vbd_unplug(s, c, p)));
    a("VBD.insert", |s, _, p| Box::pin(vbd_media(s, p, true)));
    a("VBD.eject", |s, _, p| Box::pin(vbd_media(s, p, false)));
}
