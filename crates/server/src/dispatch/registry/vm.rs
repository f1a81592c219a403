//! The VM and VBD handlers: wire names to the operations of forward::vm
//! and ops::vm, each with its message's argument struct.

use crate::core::call::void;
use crate::core::records::db;
use crate::dispatch::registry::{Table, untyped_async};
use crate::forward::vm as fvm;
use crate::ops::host::host_shutdown_vms;
use crate::ops::query::int;
use crate::ops::vbd::{vbd_media, vbd_plug, vbd_unplug};
use crate::ops::vm::clone::{vm_clone_or_copy, vm_destroy, vm_provision};
use crate::ops::vm::lifecycle::{refresh_allowed, vm_assert_operation_valid};
use crate::ops::vm::memory::set_memory;
use crate::ops::vm::placement::{host_free_memory, vm_assert_can_boot_here};
use corral_model::Value;
use corral_model::args::{host, vbd, vm};
use corral_model::schema::field;

pub fn register(t: &mut Table) {
    t.on(fvm::start);
    t.on(fvm::start_on);
    t.on(fvm::clean_shutdown);
    t.on(fvm::shutdown);
    t.on(fvm::hard_shutdown);
    t.on(fvm::clean_reboot);
    t.on(fvm::hard_reboot);
    t.on(fvm::pause);
    t.on(fvm::unpause);
    t.on(fvm::suspend);
    t.on(fvm::resume);
    t.on(fvm::resume_on);
    t.on(fvm::power_state_reset);
    t.untyped(
        "VM.destroy",
        untyped_async(|s, c, p| Box::pin(vm_destroy(s, c, p))),
    );
    t.on(|s, c, a: vm::Clone| async move {
        vm_clone_or_copy(s, c, a.vm.as_str(), &a.new_name, None).await
    });
    t.on(|s, c, a: vm::Copy| async move {
        vm_clone_or_copy(s, c, a.vm.as_str(), &a.new_name, Some(a.sr.as_str())).await
    });
    t.on(|s, c, a: vm::Provision| async move { vm_provision(s, c, a.vm.as_str()).await });
    t.on(|s, _, a: vm::AssertOperationValid| async move {
        vm_assert_operation_valid(&s, a.self_.as_str(), a.op)
    });
    t.on(|s, _, a: vm::AssertCanBootHere| async move {
        vm_assert_can_boot_here(&s, a.self_.as_str(), a.host.as_str())
    });
    t.on(|s, _, a: vm::UpdateAllowedOperations| async move {
        db(s.db.write(|t| refresh_allowed(t, a.self_.as_str())))?;
        void()
    });
    t.on(|s, _, a: vm::ComputeMemoryOverhead| async move {
        let m = int(&s.db.read(), field::vm::MEMORY_STATIC_MAX, a.vm.as_str());
        Ok(Value::Int(s.local().agent.memory_overhead(m)))
    });
    t.on(|s, _, _: host::ComputeFreeMemory| async move {
        Ok(Value::Int(host_free_memory(&s.local(), &s.db.read()).1))
    });
    t.on(|s, _, a: vm::SetMemoryLimits| async move {
        let (smin, smax) = (Some(a.static_min), Some(a.static_max));
        let (dmin, dmax) = (Some(a.dynamic_min), Some(a.dynamic_max));
        set_memory(&s, a.self_.as_str(), smin, smax, dmin, dmax).await
    });
    t.on(|s, _, a: vm::SetMemoryStaticRange| async move {
        set_memory(&s, a.self_.as_str(), Some(a.min), Some(a.max), None, None).await
    });
    t.on(|s, _, a: vm::SetMemoryDynamicRange| async move {
        set_memory(&s, a.self_.as_str(), None, None, Some(a.min), Some(a.max)).await
    });
    t.on(|s, _, a: vm::SetMemory| async move {
        let v = Some(a.value);
        set_memory(&s, a.self_.as_str(), None, v, v, v).await
    });
    t.on(
        |s, c, a: host::ShutdownVms| async move { host_shutdown_vms(s, c, a.host.as_str()).await },
    );
    t.on(|s, _, a: vbd::Plug| async move { vbd_plug(s, a.self_.as_str()).await });
    t.on(|s, _, a: vbd::Unplug| async move { vbd_unplug(s, a.self_.as_str()).await });
    t.on(|s, _, a: vbd::UnplugForce| async move { vbd_unplug(s, a.self_.as_str()).await });
    t.on(|s, _, a: vbd::Insert| async move {
        vbd_media(s, a.vbd.as_str(), Some(a.vdi.as_str())).await
    });
    t.on(|s, _, a: vbd::Eject| async move { vbd_media(s, a.vbd.as_str(), None).await });
}
